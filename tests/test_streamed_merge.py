"""Expert merging (M-SMoE, HC-SMoE), HEAPr and NAEE streamed from the shards: the same groups, widths,
report and exported tensors as the in-memory API; HEAPr's layer-wise gradient checkpointing equals a
whole-model backward (the oracle below); a planted Super Expert survives a streamed merge bit for bit,
also when merging and quantization share the pass; bad requests are refused before any weight is read."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from secompress.adapters import get_adapter
from secompress.checkpoints import load_model, load_tokenizer
from secompress.data import CalibrationData, load_calibration
from secompress.errors import SecompressError
from secompress.experts import expert_weights
from secompress.profile import ProfileConfig, profile
from secompress.prune import PruneConfig, prune, save_pruned
from secompress.compress import Job
from secompress.pipeline import Streamed
from secompress.prune.layer_stats import LayerStats, capture, frozen
from secompress.prune.methods.heapr import fisher_stats
from secompress.quant.api import QuantConfig
from secompress.source import Source
from secompress.testing import make_tiny, plant_super_expert, save_tiny

from test_streamed import DeviceTrap, streamed

N, S, B = 4, 24, 2  # calibration windows, their length, windows per batch


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _setup(tmp_path, model_type, plant=None):
    m = make_tiny(model_type, num_hidden_layers=3)
    if plant is not None:
        plant(m)
    src = save_tiny(m, tmp_path / "in")
    tok = load_tokenizer(src)
    calib = load_calibration("builtin", tok, N, S)
    calib = CalibrationData(calib.input_ids, calib.source, calib.sha256)
    model = load_model(src, torch.float32)
    prof = profile(model, tok, data=calib, config=ProfileConfig(num_samples=N, seq_len=S, batch_size=B),
                   progress=False)
    return src, tok, calib, model, prof


def _both(tmp_path, model_type, method, hessian="identity", plant=None):
    """(in-memory PruneResult, streamed PruneResult, in-memory tensors, streamed tensors, output dirs)."""
    src, tok, calib, model, prof = _setup(tmp_path, model_type, plant)
    pc = PruneConfig(0.5, method, calib_samples=N, eval_samples=0, seq_len=S, batch_size=B, hessian=hessian)
    r = prune(model, tok, pc, profile=prof, data=calib)
    save_pruned(model, tok, r, tmp_path / "mem")
    plan, go = streamed(src, Job(prune=pc, batch_size=B), prof, calib=calib.input_ids)
    with DeviceTrap() as trap:  # every tensor the streamed pass makes names its device
        res = go(None, tmp_path / "str", tok, progress=False)
    assert trap.hits == [], trap.hits[:5]
    rs = res.prune_result(prof, calib.source)
    return r, rs, _tensors(tmp_path / "mem"), _tensors(tmp_path / "str"), plan


def _same_report(r, rs):
    a, b = r.to_json(), rs.to_json()
    for k in ("layers", "num_experts_after", "parameters", "bytes", "details", "removed_super_experts"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("model_type,method", [("qwen2_moe", "m-smoe"), ("deepseek_v3", "m-smoe"),
                                               ("mixtral", "hc-smoe"), ("deepseek_v3", "hc-smoe"),
                                               ("qwen2_moe", "heapr"), ("olmoe", "heapr"),
                                               ("qwen3_moe", "naee"), ("gpt_oss", "naee")])
def test_streamed_equals_in_memory(tmp_path, model_type, method):
    r, rs, a, b, plan = _both(tmp_path, model_type, method)
    _same_report(r, rs)
    specs = {s.name: tuple(s.shape) for s in plan.out_specs}
    assert set(a) == set(b) == set(specs)
    for k in a:
        assert tuple(b[k].shape) == specs[k] and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "mem" / "config.json").read_text()) == \
        json.loads((tmp_path / "str" / "config.json").read_text())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_streamed_heapr_fisher_matches_in_memory(tmp_path, model_type):
    """Layer-wise gradient checkpointing gives the in-memory backward's dL/dy: the same graph per layer,
    the incoming gradient handed on (scores held to 1e-6: a device's kernels may order sums differently)."""
    r, rs, a, b, plan = _both(tmp_path, model_type, "heapr", hessian="fisher")
    _same_report(r, rs)
    # the up-front estimate counts what the backward pass keeps: every layer's calibration input from the first MoE layer
    cfg = plan.source.config
    kept = (cfg.num_hidden_layers - min(plan.mplan.moe_layers)) * N * S * cfg.hidden_size * 4
    assert plan.peak_bytes() - dataclasses.replace(plan, mplan=None).peak_bytes() >= kept
    for k in a:
        assert torch.equal(a[k], b[k]), k
    src, _, calib, model, _ = _setup(tmp_path / "again", model_type)
    mem = _whole_model_fisher(model, calib.input_ids)
    st = fisher_stats(Streamed(Source.open(src, dtype=torch.float32, device="cpu")), plan.mplan, progress=False)
    for l in mem:  # the same per-layer graphs, chunks and float64 sums; a backend may order sums differently
        torch.testing.assert_close(st[l].heapr, mem[l].heapr, rtol=1e-6, atol=0)
        assert torch.equal(st[l].freq, mem[l].freq)


def _whole_model_fisher(model, ids) -> dict:
    """The oracle: HEAPr statistics with dL/dy from one whole-model backward of the next-token loss per batch."""
    ad = get_adapter(model.config)
    layers = ad.moe_layer_indices(model)
    stats = {l: LayerStats(ad.num_experts(model.config), frozenset({"heapr"})) for l in layers}
    emb = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
    try:
        for chunk in ids.split(B):
            store: dict = {}
            with capture(model, ad, layers, store, True), frozen(model), torch.enable_grad():
                loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
                g = torch.autograd.grad(loss, [store[l]["y"] for l in layers])
            for l, gl in zip(layers, g):
                store[l]["grad"] = gl.reshape(-1, gl.shape[-1])
                stats[l].observe_captured(ad.experts_of(ad.block_of(ad.layers(model)[l])), store[l])
    finally:
        emb.remove()
    return stats


def test_streamed_merge_keeps_a_planted_super_expert_bit_identical(tmp_path):
    def plant(m):
        plant_super_expert(m, 1, 3, scale=300.0)

    r, rs, a, b, _ = _both(tmp_path, "qwen3_moe", "m-smoe", plant=plant)
    assert rs.super_experts == [(1, 3)] and rs.removed_super_experts == []
    assert (3,) in [tuple(g) for g in rs.extra["merge"]["groups"]["1"]]
    src_model = make_tiny("qwen3_moe", num_hidden_layers=3)
    plant(src_model)
    ad = get_adapter(src_model.config)
    se = expert_weights(ad.experts_of(ad.block_of(ad.layers(src_model)[1])), 3)
    merged = load_model(tmp_path / "str", torch.float32)
    new = rs.kept[1].index(3)
    after = expert_weights(ad.experts_of(ad.block_of(ad.layers(merged)[1])), new)
    for k, v in se.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(ad.router_of(ad.block_of(ad.layers(merged)[1])).weight[new],
                       ad.router_of(ad.block_of(ad.layers(src_model)[1])).weight[3])


def test_streamed_merge_and_heapr_refuse_bad_input_up_front(tmp_path, capsys, monkeypatch):
    import sys

    from secompress.cli import main

    src, tok, calib, model, prof = _setup(tmp_path, "qwen3_moe")
    job = lambda method, ratio=0.5, **k: Job(prune=PruneConfig(ratio, method, **k))  # noqa: E731
    with pytest.raises(ValueError, match="fewer than top_k"):
        streamed(src, job("m-smoe", 0.9), prof, calib=calib.input_ids)  # 8 -> 1 expert, top_k 2
    with pytest.raises(ValueError, match="kept width"):
        streamed(src, job("heapr", 0.99), prof, calib=calib.input_ids)  # 32 -> 0 neurons
    other = profile(make_tiny("mixtral"), tok, config=ProfileConfig(num_samples=2, seq_len=32), progress=False)
    with pytest.raises(SecompressError, match="profile is of a mixtral"):
        streamed(src, job("hc-smoe"), other, calib=calib.input_ids)
    with pytest.raises(ValueError, match="calibration windows"):
        streamed(src, job("heapr"), prof)
    aux = save_tiny(make_tiny("qwen3_moe", num_hidden_layers=3, output_router_logits=True), tmp_path / "aux")
    with pytest.raises(ValueError, match="hessian: identity"):
        streamed(aux, job("heapr"), prof, calib=calib.input_ids)
    streamed(aux, job("heapr", hessian="identity"), prof, calib=calib.input_ids)  # forward-only: fine
    with pytest.raises(ValueError, match="se_mode 'layer'"):  # a merge renumbers the SEs during the pass
        streamed(src, Job(prune=PruneConfig(0.5, "m-smoe"), quant=QuantConfig(bits=4, format="dequantized")),
                 _with_se(prof), calib=calib.input_ids)

    def no(*a, **k):
        raise AssertionError("profiled before the ratio was checked")

    monkeypatch.setattr(sys.modules["secompress.profile"], "profile", no)
    capsys.readouterr()
    for method, ratio, says in (("m-smoe", "0.9", "top_k"), ("heapr", "0.99", "kept width")):
        out = tmp_path / f"o-{method}"
        assert main(["prune", str(src), "--ratio", ratio, "--method", method, "--streaming", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and not out.exists(), err


def _with_se(prof, se=(1, 3)):
    """The profile with a Super Expert (the tiny random model has none)."""
    return dataclasses.replace(prof, super_experts=[se])


def test_merge_and_quantize_in_one_streamed_pass_keep_the_se_layer_16_bit(tmp_path):
    """Merging renumbers the experts during the pass: the SE's whole layer stays 16-bit (se_mode layer), the
    SE bit-identical under its new id, the plan names it by that id, and the export reloads."""
    def plant(m):
        plant_super_expert(m, 1, 3, scale=300.0)

    src, tok, calib, model, prof = _setup(tmp_path, "qwen3_moe", plant)
    assert prof.se_ids() == [(1, 3)]
    job = Job(prune=PruneConfig(0.5, "m-smoe", batch_size=B), quant=QuantConfig(bits=4, group_size=8), batch_size=B)
    plan, go = streamed(src, job, prof, calib=calib.input_ids)
    res = go(None, tmp_path / "out", tok, progress=False)
    new = res.prune_step.decisions[1].representatives.index(3)
    assert plan.quant_plan.super_experts == [(1, new)]
    assert all(plan.quant_plan.bits[n] is None for n, u in plan.quant_plan.units.items()
               if u.layer == 1 and u.expert is not None)
    import secompress

    back = secompress.load(tmp_path / "out")
    ad = get_adapter(back.config)
    src_model = make_tiny("qwen3_moe", num_hidden_layers=3)
    plant(src_model)
    se = expert_weights(ad.experts_of(ad.block_of(ad.layers(src_model)[1])), 3)
    after = expert_weights(ad.experts_of(ad.block_of(ad.layers(back)[1])), new)
    for k, v in se.items():
        assert torch.equal(after[k], v), k


def test_cli_prune_streaming_merges_and_prunes_neurons_like_in_memory(tmp_path):
    from secompress.cli import main

    src = str(save_tiny(make_tiny("olmoe", num_hidden_layers=3), tmp_path / "in"))
    common = ["--ratio", "0.5", "--samples", "4", "--eval-samples", "2", "--seq-len", "32", "--device", "cpu",
              "--batch-size", "2"]
    for method in ("hc-smoe", "heapr"):  # heapr: the default Fisher Hessian
        assert main(["prune", src, "--method", method, *common, "--out", str(tmp_path / f"m-{method}")]) == 0
        assert main(["prune", src, "--method", method, *common, "--streaming", "--out", str(tmp_path / f"s-{method}")]) == 0
        a, b = (json.loads((tmp_path / f"{d}-{method}" / "prune_report.json").read_text()) for d in "ms")
        for k in ("layers", "details", "parameters", "num_experts_after"):
            assert a[k] == b[k], (method, k)
        assert a["perplexity"]["after"] == b["perplexity"]["after"]
        ta, tb = _tensors(tmp_path / f"m-{method}"), _tensors(tmp_path / f"s-{method}")
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_recipe_streamed_heapr_with_rtn_matches_in_memory(tmp_path, planted_qwen2_moe):
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe

    src = planted_qwen2_moe
    text = f"""\
version: 1
name: tiny
model: {{id: {src}, model_type: qwen2_moe, streaming: STREAMING}}
data: {{num_samples: 4, seq_len: 32, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.5, method: heapr}}
  - quantize: {{method: rtn, bits: 4, group_size: 16, se_mode: layer}}
  - evaluate: {{perplexity: true}}
  - export: {{format: dequantized}}
"""
    runs = {}
    for mode in ("false", "true"):
        t = text.replace("STREAMING", mode)
        runs[mode] = run_recipe(parse_recipe(t, "t.yaml"), t, tmp_path / mode, progress=False)
    mem, st = runs["false"], runs["true"]
    assert st.manifest["mode"] == "streamed"
    assert st.comparison.rows["perplexity"] == mem.comparison.rows["perplexity"]
    a, b = _tensors(tmp_path / "false" / "model"), _tensors(tmp_path / "true" / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "model" / "prune_report.json").read_text()) for d in ("false", "true"))
    assert ra["details"] == rb["details"] and ra["layers"] == rb["layers"]
