"""GPTQ through gptqmodel: the plan's Super Expert stays 16-bit, the rest is GPTQ-packed."""
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from secompress.bytetok import build_byte_tokenizer
from secompress.data import load_calibration
from secompress.layout import PerExpertExperts
from secompress.quant.api import QuantConfig, plan_quantization
from secompress.quant.gptq import dynamic_from_plan, gptq_quantize
from secompress.testing import make_tiny, plant_super_expert, save_tiny
from test_quant import fake_profile

# gptqmodel patches transformers on import: it is only ever imported in a child process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs the gptq extra")
SE = (1, 3)


def test_dynamic_overrides_follow_the_plan():
    model = make_tiny("qwen3_moe")
    plan = plan_quantization(model, QuantConfig(bits=4, group_size=32, se_bits=8, format="dequantized"), profile=fake_profile(model))
    dyn = dynamic_from_plan(plan, 4)
    assert dyn == {r"+:.*model\.layers\.1\.mlp\.experts\.3\..*": {"bits": 8}}
    plan16 = plan_quantization(model, QuantConfig(bits=4, group_size=32, format="dequantized"), profile=fake_profile(model))
    assert dynamic_from_plan(plan16, 4) == {r"-:.*model\.layers\.1\.mlp\.experts\.3\..*": {}}


def test_gptq_keeps_the_super_expert_and_packs_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    model = make_tiny("qwen3_moe")
    plant_super_expert(model, *SE)
    src = save_tiny(model, tmp_path / "src")
    tok = build_byte_tokenizer()
    plan = plan_quantization(model, QuantConfig(bits=4, group_size=32, format="dequantized"), profile=fake_profile(model))
    calib = load_calibration("builtin", tok, num_samples=8, seq_len=64).input_ids
    info = gptq_quantize(src, tok, plan, calib, tmp_path / "q", bits=4, group_size=32)
    assert info["quantize_s"] > 0
    orig = PerExpertExperts(model.model.layers[1].mlp.experts).per_expert[3]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for p in ("gate_proj", "up_proj", "down_proj"):
            w = f.get_tensor(f"model.layers.1.mlp.experts.3.{p}.weight")
            # the SE: not quantized, exactly the original in gptqmodel's 16-bit dtype (bf16 here)
            assert w.dtype in (torch.bfloat16, torch.float16)
            assert torch.equal(w, getattr(orig, p).weight.detach().to(w.dtype))
            assert f"model.layers.1.mlp.experts.4.{p}.qweight" in keys  # its neighbours: GPTQ-packed
            assert f.get_tensor(f"model.layers.1.mlp.experts.4.{p}.qweight").dtype == torch.int32
    assert (tmp_path / "q" / "quantization_plan.json").is_file()
    # round trip: a fresh process reloads the checkpoint with GPTQModel.load and gets the same logits
    # as the quantizing process had, and they stay close to the 16-bit model's
    from secompress.quant.gptq import reload_logits

    again = reload_logits(tmp_path / "q", calib[:2])
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, info["probe_logits"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref = model(input_ids=calib[:2]).logits
    assert ((again - ref).abs().mean() / ref.abs().mean()) < 0.25
    # the same codes read back into this process's model (what the recipe pipeline evaluates):
    # float-precision close to gptqmodel's own kernels, and far from the 16-bit model
    from secompress.quant.gptq_codes import load_gptq_codes

    mine = make_tiny("qwen3_moe")
    plant_super_expert(mine, *SE)
    load_gptq_codes(mine, plan, tmp_path / "q")
    assert mine.model.layers[1].mlp.experts.qtensor(4, "down_proj") is not None
    assert mine.model.layers[1].mlp.experts.qtensor(3, "down_proj") is None  # the SE, 16-bit
    with torch.no_grad():
        got = mine(input_ids=calib[:2]).logits
    rel = lambda a, b: float((a - b).abs().mean() / b.abs().mean())
    assert rel(got, again) < 0.02 and rel(got, again) < rel(ref, again) / 4, (rel(got, again), rel(ref, again))
    import json

    assert json.loads((tmp_path / "q" / "config.json").read_text())["num_experts"] == 8  # legacy key kept
    # gptqmodel's silent low-sample RTN fallback is off unless asked for: every weight is GPTQ
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"].get("fallback") is None
    assert "gptqmodel" not in __import__("sys").modules  # this process's transformers is untouched


def test_cli_quantize_gptq(tmp_path):
    from secompress.cli import main

    model = make_tiny("olmoe")
    src = save_tiny(model, tmp_path / "src")
    assert main(["quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:  # compressed-tensors, the default
        assert any(k.endswith("experts.0.down_proj.weight_packed") for k in f.keys())
        assert any(k.endswith("experts.0.down_proj.weight_zero_point") for k in f.keys())  # asymmetric GPTQ
    assert main(["quantize", str(src), "--method", "gptq", "--out", str(tmp_path / "q")]) == 2  # exists


def test_gptq_refuses_uncalibrated_experts(tmp_path, capsys):
    from secompress.cli import main
    from secompress.profile import profile
    from secompress.profile_io import save_profile
    import dataclasses

    model = make_tiny("qwen3_moe")
    src = save_tiny(model, tmp_path / "src")
    prof = profile(model, build_byte_tokenizer(), data="builtin", progress=False)
    tokens = prof.arrays["tokens"].copy()
    tokens[2, 5] = 0  # as if no calibration token reached expert (2, 5)
    save_profile(dataclasses.replace(prof, arrays={**prof.arrays, "tokens": tokens}), tmp_path / "prof")
    assert main(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--profile", str(tmp_path / "prof"),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "got no calibration token: (2, 5)" in err and "--fallback rtn" in err and "--calibration all-experts" in err
    assert not (tmp_path / "q").exists()
    # all-expert calibration: gptqmodel forwards every calibration token through every expert
    assert main(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--profile", str(tmp_path / "prof"),
                 "--calibration", "all-experts", "--num-samples", "4", "--seq-len", "32", "--format", "gptqmodel", "--out", str(tmp_path / "q")]) == 0
    qcfg = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qcfg["meta"]["moe"]["routing"]["class"] == "ExpertsRoutingBypass"


def test_uncalibrated_expert_with_explicit_rtn_fallback(tmp_path):
    from secompress.cli import main
    from secompress.profile import profile
    from secompress.profile_io import save_profile
    import dataclasses
    import json

    model = make_tiny("qwen3_moe")
    src = save_tiny(model, tmp_path / "src")
    prof = profile(model, build_byte_tokenizer(), data="builtin", progress=False)
    tokens = prof.arrays["tokens"].copy()
    tokens[2, 5] = 0
    save_profile(dataclasses.replace(prof, arrays={**prof.arrays, "tokens": tokens}), tmp_path / "prof")
    assert main(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--profile", str(tmp_path / "prof"),
                 "--fallback", "rtn", "--format", "gptqmodel", "--out", str(tmp_path / "q")]) == 0
    fb = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"].get("fallback")
    assert fb and fb.get("strategy") == "rtn"  # gptqmodel's low-sample RTN fallback, chosen explicitly
