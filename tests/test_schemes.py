"""The scheme registry: compressed-tensors' own presets, validated against shapes, configs and methods."""
import types

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402

from secompress.errors import SecompressError  # noqa: E402
from secompress.quant.schemes import (SUPPORTED, check_config, check_shapes, custom_scheme,  # noqa: E402
                                      get_scheme, schemes)


def test_registry_is_built_from_the_library_presets():
    reg = schemes()
    assert list(reg) == list(SUPPORTED) and all(n in PRESET_SCHEMES for n in reg)
    for name, s in reg.items():
        ct = PRESET_SCHEMES[name]
        dumped = s.ct_scheme(["Linear"])
        assert dumped.weights.model_dump() == ct["weights"].model_dump()
        ia = ct.get("input_activations")
        assert (dumped.input_activations is None) == (ia is None)
        assert ia is None or dumped.input_activations.model_dump() == ia.model_dump()
        assert s.weights.num_bits == ct["weights"].num_bits and s.weights.strategy == ct["weights"].strategy
    assert get_scheme("fp8") is get_scheme("FP8") or get_scheme("fp8") == get_scheme("FP8")
    assert get_scheme("INT8") == get_scheme("W8A8").__class__(**{**get_scheme("W8A8").__dict__, "name": "INT8"})


@pytest.mark.parametrize("name,fmt,static,wbits", [
    ("FP8", "float-quantized", True, 8), ("FP8_DYNAMIC", "float-quantized", False, 8),
    ("FP8_BLOCK", "float-quantized", False, 8), ("W8A8", "int-quantized", False, 8),
    ("NVFP4", "nvfp4-pack-quantized", True, 4), ("NVFP4A16", "nvfp4-pack-quantized", False, 4),
    ("MXFP4", "mxfp4-pack-quantized", False, 4), ("W4A16", "pack-quantized", False, 4)])
def test_formats_and_static_inputs(name, fmt, static, wbits):
    s = get_scheme(name)
    assert (s.format, s.static_inputs, s.weight_bits) == (fmt, static, wbits)


def test_unknown_and_unimplemented_names_list_the_supported_ones():
    with pytest.raises(SecompressError, match="unknown scheme 'FP9'.*FP8, FP8_DYNAMIC") as e:
        get_scheme("FP9")
    assert "\n" not in str(e.value)
    with pytest.raises(SecompressError, match="preset secompress does not implement.*NVFP4"):
        get_scheme("MXFP8")


def test_shapes_group_and_block_rules():
    nv, mx, blk, w4 = (get_scheme(n) for n in ("NVFP4", "MXFP4", "FP8_BLOCK", "W4A16"))
    assert check_shapes(nv, {"q": (64, 64)}, experts=(64, 32)) == []
    errs = check_shapes(nv, {"q": (64, 40)})
    assert errs and errs[0][0] == "error" and "group size 16" in errs[0][1]
    assert any("multiple of 32" in t for _, t in check_shapes(mx, {}, experts=(64, 48)))
    assert any("blocks do not tile" in t for _, t in check_shapes(blk, {"o": (256, 64)}))
    assert any("block_n 128" in t for _, t in check_shapes(blk, {}, experts=(256, 64)))
    assert check_shapes(blk, {"o": (256, 256)}, experts=(256, 256)) == []
    notes = check_shapes(w4, {"q": (96, 128)}, experts=(256, 128))
    assert [s for s, _ in notes] == ["note"]  # Marlin misalignment (O % 64): served by a slower kernel
    assert [s for s, _ in check_shapes(w4, {}, experts=(128, 96))] == ["error", "note"]  # 96: no multiple of 128


def test_static_int8_activations_are_refused_for_fused_moe():
    s = custom_scheme("W8A8-static", weights=QuantizationArgs(num_bits=8, type="int", strategy="channel"),
                      input_activations=QuantizationArgs(num_bits=8, type="int", strategy="tensor", dynamic=False))
    assert not s.preset and s.static_inputs and s.format == "int-quantized"
    assert check_shapes(s, {"q": (64, 64)}) == []
    assert any("dynamic per-token" in t for _, t in check_shapes(s, {}, experts=(64, 64)))
    with pytest.raises(SecompressError, match="preset name"):
        custom_scheme("fp8", weights=QuantizationArgs(num_bits=8, type="float"))


def test_fp8_checkpoint_and_method_are_refused_up_front():
    fp8_cfg = types.SimpleNamespace(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(SecompressError, match="FP8 already"):
        check_config(get_scheme("FP8_DYNAMIC"), fp8_cfg)
    check_config(get_scheme("NVFP4"), fp8_cfg)  # a lower precision from an FP8 checkpoint is fine
    check_config(get_scheme("FP8"), types.SimpleNamespace())
    from secompress.quant.backends import get_backend

    with pytest.raises(ValueError, match="method bnb"):
        get_backend("bnb").for_scheme(get_scheme("FP8"))
    with pytest.raises(ValueError, match="gptqmodel makes integer weight-only"):
        get_backend("gptq").for_scheme(get_scheme("NVFP4"))
    assert get_backend("gptq").for_scheme(get_scheme("W4A16")).name == "gptq"
    assert get_backend("rtn").for_scheme(get_scheme("W4A16")).name == "rtn"  # rtn's own integer codes
    assert get_backend("rtn").for_scheme(get_scheme("NVFP4")).name == "scheme"


def test_se_layer_scheme_is_eight_bit_dynamic():
    from secompress.quant.schemes import se_scheme_for

    assert se_scheme_for(get_scheme("NVFP4"), None) is None  # se_bits 16: the layer stays 16-bit
    assert se_scheme_for(get_scheme("NVFP4"), 8).name == "FP8_DYNAMIC"
    assert se_scheme_for(get_scheme("FP8"), 8).inputs.dynamic is True
    assert se_scheme_for(get_scheme("W4A16"), 8).name == "W8A16"


def test_describe():
    d = get_scheme("NVFP4").describe()
    assert "float4 tensor_group 16" in d and "static global, dynamic local" in d
    assert torch.float8_e4m3fn == get_scheme("NVFP4").weights.scale_dtype


def test_model_check_on_a_skeleton_reads_no_weight():
    from secompress.quant.schemes import check_model, model_shapes
    from secompress.streaming import build_skeleton
    from secompress.testing import tiny_config

    skel = build_skeleton(tiny_config("qwen3_moe"))  # meta device: shapes only
    linears, experts = model_shapes(skel)
    assert experts == (64, 32) and linears["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert check_model(get_scheme("NVFP4"), skel) == []
    with pytest.raises(SecompressError, match="cannot be served on this model: .*group size 128") as e:
        check_model(get_scheme("W4A16"), skel)
    assert "more" in str(e.value) and "\n" not in str(e.value)
