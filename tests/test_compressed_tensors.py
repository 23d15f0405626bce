"""The compressed-tensors export: written with the library, read back exactly, served by vLLM's rule."""
import copy
import json

import numpy as np
import pytest
import torch

from conftest import ARCHS
from secompress.adapters import get_adapter
from secompress.cli import main
from secompress.errors import SecompressError
from secompress.profile import ProfileResult
from secompress.quant import QuantConfig, quantize_, rtn
from secompress.quant.api import dequantized
from secompress.quant.compressed_tensors import load_ct, scheme_of, vllm_rule_problems
from secompress.quant.formats.ct import save_ct
from secompress.se_rule import SERule
from secompress.quant.ct_codes import from_signed, to_signed
from secompress.quant.fused import FusedQuantizedExperts, pack_codes, unpack_codes
from secompress.testing import make_tiny, plant_super_expert

pytest.importorskip("compressed_tensors", reason="needs the ct extra")
SE = (1, 3)


def _profile(m, ses=(SE,)):
    """A profile naming ``ses`` as the Super Experts (any architecture)."""
    ad = get_adapter(m.config)
    L, E = len(ad.layers(m)), ad.num_experts(m.config)
    tokens = np.full((L, E + 1), 100, dtype=np.int64)
    return ProfileResult(model="tiny", model_type=m.config.model_type, num_experts=E, moe_layers=list(range(L)),
                         has_shared=False, rule=SERule(), data_source="test", data_sha256="", num_tokens=0,
                         arrays={"tokens": tokens, "hidden_max": np.ones(L)}, super_experts=list(ses))


def _quantized(arch, **kw):
    m = make_tiny(arch)
    plant_super_expert(m, *SE)
    base = copy.deepcopy(m)
    cfg = dict(bits=4, group_size=8, symmetric=True, se_mode="layer")
    plan = quantize_(m, QuantConfig(**{**cfg, **kw}), profile=_profile(m))
    return base, m, plan


def _dequantizer_weights(out):
    """compressed-tensors' own dequantizer over the written file (float32, no model involved)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    return CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_file(out / "model.safetensors"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))


def test_pack_codes_and_signed_codes_round_trip():
    for b in rtn.BITS:
        c = torch.randint(0, 2 ** b, (3, 5, 64), dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(c, b), b, 64), c)
    assert pack_codes(torch.zeros(2, 64, dtype=torch.uint8), 4).shape == (2, 32)
    w = torch.randn(8, 32)
    for sym in (True, False):
        qt = rtn.quantize(w, 4, 8, sym)
        back = from_signed(*to_signed(qt, sym), 4)
        assert all(torch.equal(getattr(back, f), getattr(qt, f)) for f in ("codes", "scales", "zeros"))
    with pytest.raises(SecompressError, match="asymmetric"):
        to_signed(rtn.quantize(w, 4, 8, False), symmetric=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_exports_and_reloads_exactly(arch, tmp_path, ids):
    base, m, plan = _quantized(arch)
    out = save_ct(m, None, plan, tmp_path / "ct")
    ad = get_adapter(m.config)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert vllm_rule_problems(qcfg, plan, ad) == []
    compat = json.loads((out / "quantization_plan.json").read_text())["compatibility"]
    assert not compat["transformers"]["ok"]  # the SE layer in `ignore`: the transformers 5.24 gap
    assert compat["vllm"]["ok"] == (arch != "gpt_oss") and compat["secompress.load"]["ok"]
    files = _dequantizer_weights(out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = [k for k in keys if k.endswith("weight_packed")]
        assert packed and all(f.get_tensor(k).dtype == torch.int32 for k in packed[:5])
    e0 = [k for k in packed if ".experts.0." in k and f"layers.{SE[0]}." not in k]
    assert e0, "per-expert packed keys"
    # the SE layer: every expert plain and bit-identical (fused transformers tensors vs per-expert keys)
    se_keys = [k for k in keys if f"layers.{SE[0]}.{ad.ckpt_block}.experts." in k]
    assert se_keys and all(k.endswith((".weight", ".bias")) for k in se_keys)
    m2, plan2 = load_ct(out)
    assert plan2.bits == plan.bits
    assert isinstance(ad.experts_of(ad.block_of(ad.layers(m2)[0 if arch not in ("deepseek_v2", "deepseek_v3")
                                                               else 2])), FusedQuantizedExperts)
    for w in ("gate_up_proj", "down_proj"):  # SE layer untouched, as a plain fused module
        assert torch.equal(getattr(ad.experts_of(ad.block_of(ad.layers(m2)[SE[0]])), w),
                           getattr(ad.experts_of(ad.block_of(ad.layers(base)[SE[0]])), w))
    with torch.no_grad():
        a, b = m(ids).logits, m2(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # compressed-tensors' dequantizer gives exactly the weights the in-memory model computes with
    from secompress.layout import PerExpertExperts
    from secompress.streaming import disk_key

    with dequantized(m):
        for i in ad.moe_layer_indices(m):
            per = PerExpertExperts(ad.experts_of(ad.block_of(ad.layers(m)[i])))
            for k, v in per.state_dict(prefix=f"{ad.block_path(i)}.{ad.experts}.").items():
                assert torch.equal(files[disk_key(ad, k)], v), k
        q_proj = next(n for n, b in plan.bits.items() if b and plan.units[n].expert is None)
        assert torch.equal(files[f"{q_proj}.weight"], m.get_submodule(q_proj).weight)


def test_stock_transformers_loads_the_all_quantized_variant(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    import secompress

    _, m, plan = _quantized("qwen3_moe", protect_super_experts=False)
    out = save_ct(m, None, plan, tmp_path / "ct")
    compat = json.loads((out / "quantization_plan.json").read_text())["compatibility"]
    assert compat["transformers"]["ok"] and compat["vllm"]["ok"]
    # the tiny shapes (group size 8, hidden size 64) miss the Marlin MoE kernel: vLLM falls back to Triton, SGLang has
    # no fallback (secompress.quant.compat)
    assert "slower: group size 8" in compat["vllm"]["why"] and "hidden size 64" in compat["vllm"]["why"]
    assert not compat["sglang"]["ok"] and "group size 8" in compat["sglang"]["why"]
    ours = secompress.load(out)
    tf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, tf(ids).logits  # transformers decompresses on its first forward
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    with dequantized(ours):
        theirs = tf.state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())  # the very same weights


def test_written_config_follows_vllms_rule_with_an_8bit_se_layer(tmp_path):
    _, m, plan = _quantized("qwen3_moe", se_bits=8, symmetric=False)
    out = save_ct(m, None, plan, tmp_path / "ct")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ad = get_adapter(m.config)
    assert list(qcfg["config_groups"]) == ["group_0", "group_1"]  # named targets before "Linear"
    assert qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert qcfg["config_groups"]["group_1"]["targets"] == ["Linear"]
    assert qcfg["config_groups"]["group_1"]["weights"]["symmetric"] is False
    for l in range(4):  # each layer: every expert's projections share expert 0's scheme
        want = "group_0" if l == SE[0] else "group_1"
        assert {scheme_of(qcfg, f"model.layers.{l}.mlp.experts.{e}.{p}") for e in range(8)
                for p in ("gate_proj", "up_proj", "down_proj")} == {want}
    assert scheme_of(qcfg, "model.layers.0.mlp.gate") is None and scheme_of(qcfg, "lm_head") is None
    assert vllm_rule_problems(qcfg, plan, ad) == []
    compat = json.loads((out / "quantization_plan.json").read_text())["compatibility"]
    assert not compat["transformers"]["ok"] and not compat["sglang"]["ok"]
    broken = copy.deepcopy(qcfg)  # one expert ignored inside a quantized layer: vLLM cannot serve it
    broken["ignore"].append("model.layers.2.mlp.experts.5.down_proj")
    assert any("layer 2" in p for p in vllm_rule_problems(broken, plan, ad))
    broken = copy.deepcopy(qcfg)  # expert 0 alone in the 8-bit group
    broken["config_groups"]["group_0"]["targets"].append(r"re:model\.layers\.0\.mlp\.experts\.0\..*")
    assert any("layer 0" in p for p in vllm_rule_problems(broken, plan, ad))
    m2, _ = load_ct(out)  # asymmetric zero points and the 8-bit layer come back exactly
    with torch.no_grad():
        ids = torch.randint(3, 250, (1, 12))
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    files = _dequantizer_weights(out)
    with dequantized(m):
        w = m.model.layers[SE[0]].mlp.experts.down_proj[2]
        assert torch.equal(files[f"model.layers.{SE[0]}.mlp.experts.2.down_proj.weight"], w)


def test_se_mode_expert_is_refused_up_front(tmp_path, capsys):
    with pytest.raises(ValueError, match="se_mode: layer"):  # the format's own check, as the config is built
        QuantConfig(se_mode="expert")
    cfg = QuantConfig()
    assert (cfg.format, cfg.se_mode) == ("compressed-tensors", "layer")  # the defaults of rtn
    cfg = QuantConfig(format="dequantized", se_mode="expert")
    assert (cfg.format, cfg.se_mode) == ("dequantized", "expert")
    assert QuantConfig(format="dequantized").se_mode == "expert"
    with pytest.raises(ValueError, match="gptqmodel"):
        QuantConfig(format="gptqmodel")  # no longer a format (it was gptq's own)
    with pytest.raises(ValueError, match="own export only"):
        QuantConfig(method="bnb", format="dequantized")
    code = main(["quantize", str(tmp_path / "no-such-model"), "--se-mode", "expert", "--out", str(tmp_path / "o")])
    assert code == 2 and "se_mode: layer" in capsys.readouterr().err  # before the model is even looked for
    from secompress.recipe.schema import RecipeError, parse_recipe

    text = ("version: 1\nname: t\nmodel: {id: x, model_type: qwen3_moe}\nstages:\n"
            "  - quantize: {method: rtn, se_mode: expert}\n  - export: {}\n")
    with pytest.raises(RecipeError, match="se_mode: layer") as e:
        parse_recipe(text, "t.yaml")
    assert str(e.value).startswith("t.yaml:5: stages.quantize.se_mode:")
    for bad, where in (("{format: zip}", "t.yaml:6: stages.export.format: format must be one of"),
                       ("{format: gptqmodel}", "t.yaml:6: stages.export.format: format must be one of")):  # gone
        with pytest.raises(RecipeError) as e:
            parse_recipe(text.replace("se_mode: expert", "se_mode: layer").replace("export: {}", f"export: {bad}"),
                         "t.yaml")
        assert str(e.value).startswith(where), str(e.value)
    parse_recipe(text.replace("export: {}", "export: {format: dequantized}"), "t.yaml")
    _, m, plan = _quantized("qwen3_moe", se_mode="expert", format="dequantized")
    with pytest.raises(SecompressError, match="se_mode: layer"):
        save_ct(m, None, plan, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_compressed_tensors_dequantizer_gives_a_plain_checkpoint(tmp_path, ids):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from transformers import AutoModelForCausalLM

    import secompress

    _, m, plan = _quantized("qwen3_moe")  # the SE layer in `ignore`: stock transformers needs this route
    out = save_ct(m, None, plan, tmp_path / "ct")
    convert_checkpoint(out, tmp_path / "bf", CompressedTensorsDequantizer(out, dtype=torch.float32), max_workers=1)
    plain = secompress.load(tmp_path / "bf")  # no longer compressed: loaded as a plain checkpoint
    assert isinstance(plain, type(AutoModelForCausalLM.from_pretrained(tmp_path / "bf")))
    assert not any(isinstance(x, FusedQuantizedExperts) for x in plain.modules())
    with torch.no_grad():
        a, b = m(ids).logits, plain(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
