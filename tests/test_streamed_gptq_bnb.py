"""Streamed GPTQ and bitsandbytes: the export and the perplexities equal the in-memory path's
(the same per-layer step on the same calibration stream / the same quantization per layer)."""
import copy
import json

import pytest
import torch

from secompress.checkpoints import load_model, load_tokenizer
from secompress.data import CalibrationData, load_calibration
from secompress.errors import SecompressError
from secompress.perplexity import mean_loss
from secompress.profile import ProfileConfig, profile
from secompress.prune import PruneConfig, prune, remap_profile
from secompress.quant.api import QuantConfig, quantize_, save_quantized
from secompress.compress import Job
from secompress.testing import make_tiny, plant_super_expert, save_tiny
from test_streamed import DeviceTrap, _tensors, streamed


def _setup(tmp_path, model_type, n_calib=6, seq_len=24, layers=3):
    m = make_tiny(model_type, num_hidden_layers=layers)
    plant_super_expert(m, 1, 3)
    src = save_tiny(m, tmp_path / "in")
    tok = load_tokenizer(src)
    both = load_calibration("builtin", tok, n_calib + 4, seq_len)
    calib = CalibrationData(both.input_ids[:n_calib], both.source, both.sha256)
    return src, tok, calib, both.input_ids[n_calib:]


def _same_export(a_dir, b_dir, files=("config.json", "quantization_plan.json")):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in files:
        assert json.loads((a_dir / name).read_text()) == json.loads((b_dir / name).read_text()), name
    return a


@pytest.mark.parametrize("model_type, calibration, prune_too, group_size", [("qwen3_moe", "routed", True, 16),
                                                                              ("deepseek_v3", "all-experts", False, 8)])
def test_streamed_gptq_equals_in_memory(tmp_path, model_type, calibration, prune_too, group_size):
    src, tok, calib, eval_ids = _setup(tmp_path, model_type, n_calib=8, seq_len=32, layers=2)
    model = load_model(src, torch.float32)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=8, seq_len=32, batch_size=4),
                   progress=False)
    pc = PruneConfig(ratio=0.25, method="reap", eval_samples=0) if prune_too else None
    qc = QuantConfig(method="gptq", bits=4, group_size=group_size, calibration=calibration, fallback="rtn")
    assert qc.format == "compressed-tensors"
    loss_before = mean_loss(model, eval_ids, 2)
    qprof = prof if pc is None else remap_profile(prof, prune(model, tok, pc, profile=prof, data=calib))
    qplan = quantize_(model, qc, profile=qprof, tokenizer=tok, data=calib)
    loss_after = mean_loss(model, eval_ids, 2)
    save_quantized(model, tok, qplan, tmp_path / "mem")

    plan, go = streamed(src, Job(prune=pc, quant=qc, batch_size=2), prof, calib=calib.input_ids)
    with DeviceTrap() as trap:
        res = go(eval_ids, tmp_path / "str", tok, progress=False)
    assert trap.hits == [], trap.hits[:5]
    assert res.loss_before == loss_before and res.loss_after == loss_after, (res.loss_before, loss_before,
                                                                             res.loss_after, loss_after)
    a = _same_export(tmp_path / "mem", tmp_path / "str")  # the same GPTQ codes, tensor for tensor
    assert any(k.endswith("weight_packed") for _, k in a)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".str")]  # no work folder


@pytest.mark.parametrize("model_type, bits, dtype, prune_too", [
    ("qwen3_moe", 4, torch.float32, True), ("mixtral", 8, torch.float32, False), ("gpt_oss", 4, torch.bfloat16, False),
    ("deepseek_v3", 4, torch.float32, True)])
def test_streamed_bnb_bit_identical_to_in_memory(tmp_path, model_type, bits, dtype, prune_too):
    pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
    from secompress.quant.bnb_export import load_bnb

    src, tok, calib, eval_ids = _setup(tmp_path, model_type)
    model = load_model(src, dtype)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=6, seq_len=24, batch_size=3),
                   progress=False)
    pc = PruneConfig(ratio=0.25, method="reap", eval_samples=0) if prune_too else None
    qc = QuantConfig(method="bnb", bits=bits, group_size=None)
    loss_before = mean_loss(model, eval_ids, 2)
    qprof = prof
    if pc is not None:
        qprof = remap_profile(prof, prune(model, tok, pc, profile=prof, data=calib))
    qplan = quantize_(model, qc, profile=qprof)
    loss_after = mean_loss(model, eval_ids, 2)
    save_quantized(model, tok, qplan, tmp_path / "mem")

    plan, go = streamed(src, Job(prune=pc, quant=qc, batch_size=2), prof, dtype=dtype)
    assert json.dumps(plan.quant_plan.to_json()) == json.dumps(qplan.to_json())
    with DeviceTrap() as trap:
        res = go(eval_ids, tmp_path / "str", tok, progress=False)
    assert trap.hits == [], trap.hits[:5]
    assert res.loss_before == loss_before and res.loss_after == loss_after
    a = _same_export(tmp_path / "mem", tmp_path / "str")
    assert any(t.dtype == (torch.uint8 if bits == 4 else torch.int8) for t in a.values())
    size = sum(f.stat().st_size for f in (tmp_path / "str").glob("*.safetensors"))
    assert abs(plan.output_bytes - size) < 0.1 * size, (plan.output_bytes, size)  # the up-front estimate
    back, _ = load_bnb(tmp_path / "str")  # the streamed export loads with its real bnb modules
    with torch.no_grad():
        ids = eval_ids[:2]
        assert torch.equal(back(input_ids=ids).logits, copy.deepcopy(model)(input_ids=ids).logits)


def test_streamed_gptq_refuses_missing_calibration_up_front(tmp_path):
    src, tok, calib, _ = _setup(tmp_path, "qwen3_moe")
    model = load_model(src, torch.float32)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=6, seq_len=24, batch_size=3),
                   progress=False)
    with pytest.raises(SecompressError, match="calibration windows"):
        streamed(src, Job(quant=QuantConfig(method="gptq", bits=4, group_size=32)), prof)


def test_cli_quantize_streaming_bnb_matches_in_memory(tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
    from secompress.cli import main

    m = make_tiny("olmoe", num_hidden_layers=3)
    plant_super_expert(m, 1, 3)
    src = str(save_tiny(m, tmp_path / "in"))
    q = ["quantize", src, "--method", "bnb", "--bits", "4", "--group-size", "-1", "--no-se-protection", "--dtype",
         "float32", "--option", "quant_type=fp4"]
    assert main([*q, "--out", str(tmp_path / "qm")]) == 0
    assert main([*q, "--streaming", "--out", str(tmp_path / "qs")]) == 0
    assert "streamed layer by layer" in capsys.readouterr().out
    _same_export(tmp_path / "qm", tmp_path / "qs")


def test_run_recipe_streamed_bnb_matches_in_memory(tmp_path, monkeypatch, planted_qwen2_moe):
    pytest.importorskip("bitsandbytes", reason="needs the bnb extra")
    from secompress.recipe import run as runner
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe

    src = planted_qwen2_moe
    text = f"""\
version: 1
name: tiny
model: {{id: {src}, model_type: qwen2_moe, dtype: float32}}
data: {{num_samples: 4, seq_len: 32, batch_size: 4, eval_samples: 4}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: reap}}
  - quantize: {{method: bnb, bits: 4, group_size: null}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
"""
    recipe = parse_recipe(text, "t.yaml")
    mem = run_recipe(recipe, text, tmp_path / "mem", progress=False)
    monkeypatch.setattr(runner, "available_memory", lambda: 1000)  # auto: the checkpoint no longer fits
    st = run_recipe(recipe, text, tmp_path / "st", progress=False)
    assert mem.manifest["mode"] == "in memory" and st.manifest["mode"] == "streamed"
    assert st.comparison.rows["perplexity"] == mem.comparison.rows["perplexity"]
    _same_export(tmp_path / "mem" / "model", tmp_path / "st" / "model")
    assert "bitsandbytes" in (tmp_path / "st" / "model" / "README.md").read_text()
