"""The two layer sources of the one loop: a compress job streamed from the shards (prune + RTN +
export + perplexity) is bit-identical to the in-memory API on the same model, on all seven
architectures, allocates nothing without an explicit device, and refuses bad input (disk space,
unknown devices) before any compute."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from secompress.checkpoints import load_model, load_tokenizer
from secompress.data import CalibrationData, load_calibration
from secompress.devices import resolve_device
from secompress.errors import SecompressError
from secompress.perplexity import mean_loss
from secompress.profile import ProfileConfig, profile
from secompress.prune import PruneConfig, prune, remap_profile
from secompress.quant.api import CODES_NAME, QuantConfig, codes_file, quantize_, save_quantized
from secompress.shards import ShardWriter, specs_of
from secompress.compress import Job, plan_job, run_job
from secompress.pipeline import Streamed
from secompress.source import Source
from secompress.testing import TINY, make_tiny, plant_super_expert, save_tiny

PKG = str(Path(__file__).resolve().parents[1] / "secompress")
FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.rand,
             torch.randn, torch.randint, torch.eye, torch.linspace, torch.empty_strided}


class DeviceTrap(TorchFunctionMode):
    """Records every tensor factory call made from secompress's own code without an explicit device:
    such a tensor lands on the default device (the CPU) whatever device the run is on."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            f = sys._getframe(1)
            if f.f_code.co_filename.startswith(PKG):
                self.hits.append(f"{func.__name__} at {f.f_code.co_filename}:{f.f_lineno}")
        return func(*args, **kwargs)


def streamed(src, job: Job, prof=None, calib=None, dtype=torch.float32, protect=None):
    """(plan, a function running it streamed): the compress job over ``src``'s shards on the CPU."""
    source = Source.open(src, dtype=dtype, device="cpu")
    plan = plan_job(source, job, prof, protect=protect, calib=calib)
    return plan, lambda *a, **k: run_job(plan, Streamed(source), *a, **k)


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):  # the dequantized format's codes in their subfolder
        with safe_open(str(f), "pt") as h:
            out.update({(f.name == CODES_NAME, k): h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_streamed_bit_identical_to_in_memory(tmp_path, model_type):
    m = make_tiny(model_type, num_hidden_layers=3)
    plant_super_expert(m, 1, 3)
    src = save_tiny(m.to(torch.bfloat16), tmp_path / "in")  # computed in float32: config.json must say so
    tok = load_tokenizer(src)
    both = load_calibration("builtin", tok, 10, 24)
    calib = CalibrationData(both.input_ids[:6], both.source, both.sha256)
    eval_ids = both.input_ids[6:]  # [4, 24]
    model = load_model(src, torch.float32)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=6, seq_len=24, batch_size=3),
                   progress=False)
    pc, qc = PruneConfig(ratio=0.25, method="reap", eval_samples=0), QuantConfig(bits=4, group_size=8, format="dequantized")

    loss_before = mean_loss(model, eval_ids, 2)
    r = prune(model, tok, pc, profile=prof, data=calib)
    pruned = copy.deepcopy(model)
    qplan = quantize_(model, qc, profile=remap_profile(prof, r))
    loss_after = mean_loss(model, eval_ids, 2)
    save_quantized(model, tok, qplan, tmp_path / "mem")

    plan, go = streamed(src, Job(prune=pc, quant=qc, batch_size=2), prof)
    with DeviceTrap() as trap:
        res = go(eval_ids, tmp_path / "str", tok, progress=False)
    assert trap.hits == [], trap.hits[:5]
    pr = res.prune_result(prof, calib.source)
    assert plan.mplan.kept == r.kept and pr.params_after == r.params_after and pr.kept == r.kept
    assert json.dumps(plan.quant_plan.to_json()) == json.dumps(qplan.to_json())
    assert res.loss_before == loss_before and res.loss_after == loss_after
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) and any(codes for codes, _ in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with safe_open(str(codes_file(tmp_path / "mem")), "pt") as f1, \
            safe_open(str(codes_file(tmp_path / "str")), "pt") as f2:
        assert f1.metadata() == f2.metadata()
    for name in ("config.json", "quantization_plan.json"):
        assert json.loads((tmp_path / "mem" / name).read_text()) == json.loads((tmp_path / "str" / name).read_text())

    # the compressed-tensors export (the default format; the SE's layer 16-bit in `ignore`), written per layer
    qct = QuantConfig(bits=4, group_size=8, symmetric=True)
    assert qct.format == "compressed-tensors"
    save_quantized(pruned, tok, quantize_(pruned, qct, profile=remap_profile(prof, r)), tmp_path / "mem_ct")
    plan, go = streamed(src, Job(prune=pc, quant=qct), prof)
    with DeviceTrap() as trap:
        go(None, tmp_path / "str_ct", tok, progress=False)
    assert trap.hits == [], trap.hits[:5]
    a, b = _tensors(tmp_path / "mem_ct"), _tensors(tmp_path / "str_ct")
    assert set(a) == set(b) and any(k.endswith("weight_packed") for _, k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ("config.json", "quantization_plan.json"):
        assert json.loads((tmp_path / "mem_ct" / name).read_text()) == \
            json.loads((tmp_path / "str_ct" / name).read_text()), name
    size = sum(f.stat().st_size for f in (tmp_path / "str_ct").glob("*.safetensors"))
    assert abs(plan.output_bytes - size) < 0.05 * size  # the up-front estimate of the export's size


def test_shard_writer_many_shards_load_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from secompress.checkpoints import as_saved

    m = make_tiny("olmoe")
    sd = as_saved(m, m.state_dict())
    w = ShardWriter(tmp_path, specs_of(sd), max_shard_bytes=200_000)
    for k in reversed(list(sd)):  # any order
        w.write(k, sd[k])
    files = w.close()
    assert len(files) > 3 and (tmp_path / "model.safetensors.index.json") in files
    m.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.arange(20)[None]
    assert torch.equal(back(input_ids=ids).logits, m(input_ids=ids).logits)

    (tmp_path / "x").mkdir()
    w = ShardWriter(tmp_path / "x", specs_of(sd))
    k0 = next(iter(sd))
    w.write(k0, sd[k0])
    with pytest.raises(SecompressError, match="written twice"):
        w.write(k0, sd[k0])
    with pytest.raises(SecompressError, match="expected"):
        w.write(list(sd)[1], sd[k0].double())
    with pytest.raises(SecompressError, match="never written"):
        w.close()


def test_refusals_before_compute(tmp_path, monkeypatch):
    src = save_tiny(make_tiny("qwen3_moe"), tmp_path / "in")
    plan, go = streamed(src, Job(quant=QuantConfig(bits=4, group_size=16, protect_super_experts=False,
                                                   format="dequantized")))
    assert plan.output_bytes > plan.checkpoint_bytes  # dequantized export + codes
    import secompress.compress as cp

    monkeypatch.setattr(cp.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(SecompressError, match="GiB free"):
        go(None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SecompressError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SecompressError, match="no CUDA"):
            resolve_device("cuda:0")


def test_run_recipe_streamed_matches_in_memory(tmp_path, monkeypatch, planted_qwen2_moe):
    from secompress.recipe import run as runner
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe

    src = planted_qwen2_moe
    text = f"""\
version: 1
name: tiny
model: {{id: {src}, model_type: qwen2_moe}}
data: {{num_samples: 4, seq_len: 32, batch_size: 4, eval_samples: 4}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.25, method: reap}}
  - quantize: {{method: rtn, bits: 4, group_size: 16, se_mode: layer}}
  - evaluate: {{perplexity: true}}
  - export: {{format: dequantized}}
"""
    recipe = parse_recipe(text, "t.yaml")
    said = []
    mem = run_recipe(recipe, text, tmp_path / "mem", progress=False, announce=said.append)
    assert mem.manifest["mode"] == "in memory" and "memory_share" in mem.manifest["mode_reason"]
    monkeypatch.setattr(runner, "available_memory", lambda: 1000)  # auto: the checkpoint no longer fits
    st = run_recipe(recipe, text, tmp_path / "st", progress=False, announce=said.append)
    assert st.manifest["mode"] == "streamed" and said[-1].startswith("plan: streamed layer by layer on cpu")
    assert st.manifest["plan"]["estimated_peak_bytes"] > 0
    assert st.comparison.rows["perplexity"] == mem.comparison.rows["perplexity"]
    for row in ("sink/peak_massive_ratio", "sink/mean_sink_mass"):  # measured during the streamed passes
        assert st.comparison.rows[row] == mem.comparison.rows[row]
    assert st.comparison.rows["perplexity"]["se_unaware"]
    a, b = _tensors(tmp_path / "mem" / "model"), _tensors(tmp_path / "st" / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("prune_report.json", "README.md", "quantization_plan.json"):
        assert (tmp_path / "st" / "model" / f).is_file()
    ra = json.loads((tmp_path / "mem" / "model" / "prune_report.json").read_text())
    rb = json.loads((tmp_path / "st" / "model" / "prune_report.json").read_text())
    assert ra["layers"] == rb["layers"] and ra["parameters"] == rb["parameters"]


def test_cli_prune_and_quantize_streaming_match_in_memory(tmp_path, capsys):
    from secompress.cli import main

    m = make_tiny("olmoe", num_hidden_layers=3)
    plant_super_expert(m, 1, 3)
    src = str(save_tiny(m, tmp_path / "in"))
    common = ["--ratio", "0.25", "--samples", "4", "--eval-samples", "2", "--seq-len", "32", "--device", "cpu"]
    assert main(["prune", src, *common, "--out", str(tmp_path / "pm")]) == 0
    assert main(["prune", src, *common, "--streaming", "--out", str(tmp_path / "ps")]) == 0
    assert "streamed layer by layer" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "prune_report.json").read_text()) for d in ("pm", "ps"))
    assert a["layers"] == b["layers"] and a["perplexity"]["after"] == b["perplexity"]["after"]
    ta, tb = _tensors(tmp_path / "pm"), _tensors(tmp_path / "ps")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    q = ["quantize", src, "--bits", "4", "--group-size", "16", "--no-se-protection", "--dtype", "float32",
         "--format", "dequantized"]
    assert main([*q, "--out", str(tmp_path / "qm")]) == 0
    assert main([*q, "--streaming", "--out", str(tmp_path / "qs")]) == 0
    ta, tb = _tensors(tmp_path / "qm"), _tensors(tmp_path / "qs")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_gptq_has_no_format_of_its_own():  # gptqmodel's folder went with its child process
    with pytest.raises(ValueError, match="format for method 'gptq' must be one of compressed-tensors, dequantized"):
        QuantConfig(method="gptq", bits=4, group_size=16, format="gptqmodel")
