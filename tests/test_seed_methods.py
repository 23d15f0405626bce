"""The seed methods: PreMoe (TCESS pruning + retrieval), UNCURL, DERN, STUN; SEs never touched."""
import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from secompress.adapters import get_adapter
from secompress.experts import expert_weights
from secompress.profile import ProfileConfig, profile
from secompress.prune import PruneConfig, prune, save_pruned
from secompress.prune.dern_math import assign_segments, merge_segments
from secompress.prune.premoe import keep_by_score
from secompress.prune.premoe_math import nearest_pattern, tcess
from secompress.prune.select import make_plan
from secompress.prune.structural import keep_layer_neurons
from secompress.prune.stun_math import behaviour_distance, closest_to_centroid, greedy_clusters, wanda_mask
from secompress.prune.uncurl_math import (allocate_counts, eigengap_count, logit_affinity, spectral_clusters,
                                          uncurl_groups)
from secompress.testing import make_tiny

from test_prune import _low_frequency_se_model

SEEDS = ("premoe", "uncurl", "dern", "stun")
SMALL = dict(calib_samples=4, eval_samples=0, seq_len=64, batch_size=4, task_min_tokens=64)


# ---- pure math: each criterion against a hand-computed case -------------------------------------
def test_tcess_counts_top_k_logits_above_the_confidence_threshold():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])  # [T=2, E=3]
    assert tcess(logits, k=1).tolist() == [1.5, 1.0, 0.0]  # the reference code's demo: top-1 logits
    assert tcess(logits, k=2).tolist() == [1.5, 1.5, 0.5]
    # softmax over (3, 1) = (0.881, 0.119), over (2, 1) = (0.731, 0.269): r = 0.4 keeps only the top-1s
    assert tcess(logits, k=2, r=0.4).tolist() == [1.5, 1.0, 0.0]
    i, d = nearest_pattern(torch.tensor([1.0, 0.9]), torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    assert i == 1 and d.argmin() == 1
    plan = make_plan(0.5, 4, 2)
    assert keep_by_score([4.0, 3.0, 0.5, 2.0], plan).keep == (0, 1)
    d = keep_by_score([4.0, 3.0, 0.5, 2.0], plan, protected={2})  # the SE displaces the weakest kept one
    assert d.keep == (0, 2) and d.spared == (2,) and d.removed_instead == (1,)


def test_uncurl_spectral_clusters_follow_router_logit_correlation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=g), torch.randn(200, generator=g)
    noise = lambda: 0.05 * torch.randn(200, generator=g)  # noqa: E731
    logits = torch.stack([a + noise(), b + noise(), a + noise(), b + noise(), a + noise()], 1)  # [T, 5]
    gram = logits.T @ logits
    aff = logit_affinity(gram)
    assert aff[0, 2] > 0.95 and aff[0, 1] < 0.7 and aff[0, 0] == 0
    assert spectral_clusters(aff, 2) == [[0, 2, 4], [1, 3]]
    freq = torch.tensor([1.0, 5.0, 9.0, 2.0, 3.0])
    d = uncurl_groups(freq, gram, [2], [list(range(5))])
    assert set(d.groups) == {(2, 4, 0), (1, 3)}  # the most routed member represents its cluster
    d = uncurl_groups(freq, gram, [3], [list(range(5))], protected={2})  # the SE stays alone
    assert (2,) in d.groups and sorted(map(sorted, d.groups)) == [[0, 4], [1, 3], [2]]
    blocks = torch.block_diag(*[torch.ones(3, 3)] * 3) + 0.01  # three clear blocks of 3
    assert eigengap_count(blocks, 2, 8) == 3
    counts = allocate_counts([1, 3, 2], budget=12, lo=[2, 2, 2], hi=7)
    assert sum(counts) == 12 and counts == [2, 6, 4]


def test_dern_assigns_each_segment_to_the_most_similar_kept_neuron_and_averages():
    g = torch.Generator().manual_seed(0)

    def expert(I=4, H=6):
        return {"gate_proj": torch.randn(I, H, generator=g), "up_proj": torch.randn(I, H, generator=g),
                "down_proj": torch.randn(H, I, generator=g)}

    r0, r1 = expert(), expert()
    d = {k: v.clone() for k, v in r1.items()}  # dropped expert: r1's neurons in the order 2, 0, 3, 1, slightly off
    perm = [2, 0, 3, 1]
    d = {"gate_proj": r1["gate_proj"][perm] + 0.01, "up_proj": r1["up_proj"][perm], "down_proj": r1["down_proj"][:, perm]}
    segs = assign_segments({5: d}, {0: r0, 1: r1})
    assert [(s.neuron, s.target, s.target_neuron) for s in segs] == [(0, 1, 2), (1, 1, 0), (2, 1, 3), (3, 1, 1)]
    assert all(s.similarity > 0.99 for s in segs)
    assert all(s.target is None for s in assign_segments({5: d}, {0: r0}, threshold=0.9))  # nothing like r0
    merged = merge_segments(r0, 3.0, [(1, d, 0, 1.0)])  # neuron 1 of r0 <- segment 0 of d, weights 3 : 1
    torch.testing.assert_close(merged["gate_proj"][1], 0.75 * r0["gate_proj"][1] + 0.25 * d["gate_proj"][0])
    torch.testing.assert_close(merged["down_proj"][:, 1], 0.75 * r0["down_proj"][:, 1] + 0.25 * d["down_proj"][:, 0])
    assert torch.equal(merged["up_proj"][[0, 2, 3]], r0["up_proj"][[0, 2, 3]])  # untouched neurons: bit for bit


def test_stun_groups_co_selected_experts_and_wanda_masks():
    coact = torch.zeros(6, 6)
    coact[0, 3] = coact[3, 0] = 50.0  # experts 0 and 3 are chosen together most often
    coact[1, 4] = coact[4, 1] = 30.0
    coact[2, 5] = coact[5, 2] = 1.0
    dist = behaviour_distance("coact", coact=coact)
    assert dist[0, 3] < dist[1, 4] < dist[2, 5] <= 0
    assert greedy_clusters(dist, 2, [list(range(6))]) == [(0, 3), (1, 4), (2,), (5,)]
    assert greedy_clusters(dist, 2, [list(range(6))], protected={3}) == [(0,), (1, 4), (2, 5), (3,)]
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.1, 0.0], [0.0, 1.2], [-3.0, 4.0]])  # [E=6, H=2]
    dist = behaviour_distance("router", router=router)
    torch.testing.assert_close(dist[0, 3], torch.tensor(0.1, dtype=torch.float64) / router.double().norm())
    assert greedy_clusters(dist, 2, [list(range(6))]) == [(0, 3), (1, 4), (2,), (5,)]  # close rows first
    assert closest_to_centroid(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])) == 1
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5, 3.0, 1.0, -1.0, 0.1]])  # [O=1, In=8]
    in_sq = torch.tensor([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0])  # input 3 is large: 0.5 * 10 = 5
    # scores |w| * ||x||: [1, 4, 2, 5, 3, 1, 1, 0.1]
    assert wanda_mask(w, in_sq, 0.5, "unstructured").int().tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]
    assert wanda_mask(w, in_sq, 0.5, "2:4").int().tolist() == [[0, 1, 0, 1, 1, 1, 0, 0]]  # ties keep the lower index
    from compressed_tensors.utils.helpers import tensor_follows_mask_structure

    big = torch.randn(16, 32) * wanda_mask(torch.randn(16, 32), torch.rand(32), 0.5, "2:4")
    assert tensor_follows_mask_structure(big, "2:4")  # compressed-tensors' own checker
    with pytest.raises(ValueError, match="2:4"):
        wanda_mask(w, in_sq, 0.3, "2:4")


# ---- Super Experts on a tiny model: never removed, merged into or split --------------------------
@pytest.fixture(scope="module")
def se_model(tokenizer):
    model = _low_frequency_se_model()  # SE (1, 3), the least routed expert of layer 1
    prof = profile(model, tokenizer, config=ProfileConfig(num_samples=4, seq_len=64, batch_size=4), progress=False)
    assert prof.se_ids() == [(1, 3)]
    return model, prof


@pytest.mark.parametrize("method", SEEDS)
def test_planted_super_expert_stays_bit_identical_and_is_touched_without_protection(method, se_model, tokenizer):
    model0, prof = se_model
    ad = get_adapter(model0.config)
    block0 = ad.block_of(model0.model.layers[1])
    before = {k: v.clone() for k, v in expert_weights(ad.experts_of(block0), 3).items()}
    row = ad.router_of(block0).weight[3].clone()
    model = copy.deepcopy(model0)
    opts = {"dern_threshold": -1.0} if method == "dern" else {}  # every segment recombined: none may reach the SE
    r = prune(model, tokenizer, PruneConfig(0.5, method, **SMALL, **opts), profile=prof)
    assert r.removed_super_experts == [] and 3 in r.kept[1] and r.num_experts_after == 4
    new = r.kept[1].index(3)
    block = ad.block_of(model.model.layers[1])
    after = expert_weights(ad.experts_of(block), new)
    for k, v in before.items():
        assert torch.equal(after[k], v), (method, k)
    assert torch.equal(ad.router_of(block).weight[new], row)
    d = r.extra[method]
    if method == "uncurl":
        assert [3] in d["groups"]["1"]  # a cluster of its own
    if method == "dern":
        assert "3" not in d["layers"]["1"]["recombination"]["segments_per_retained_expert"]  # no segment joins it
        rec = d["layers"]["1"]["recombination"]
        assert rec["assigned"] == rec["segments"] == 4 * 32  # ... while the other retained experts took all 128
    if method == "stun":
        assert str(new) not in d["zeroed_share"]["1"] and 0.49 < d["zeroed_share"]["1"][str((new + 1) % 4)] < 0.51
    # without protection the same criterion removes, merges or prunes into the SE
    unaware = prune(copy.deepcopy(model0), tokenizer, PruneConfig(0.5, method, protect_super_experts=False, **SMALL),
                    profile=prof)
    assert unaware.removed_super_experts == [(1, 3)]


# ---- structural changes reload in stock transformers with the right shapes and logits ------------
_FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for name, path in json.loads(sys.argv[1]).items():
    m = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.arange(32).reshape(2, 16) % 250).logits
    out[name] = {"logits": logits[0, :3, :8].tolist(), "modules": [k for k in sys.modules if k.startswith("secompress")],
                 "shapes": {k: list(v.shape) for k, v in m.state_dict().items() if "experts" in k or "gate" in k}}
print(json.dumps(out))
"""


def test_every_seed_method_reloads_in_stock_transformers(tokenizer, tmp_path):
    paths, expected = {}, {}
    for arch in ("qwen3_moe", "deepseek_v3", "gpt_oss"):  # plain, grouped routing + shared expert, biased/transposed
        prof = profile(make_tiny(arch), tokenizer, config=ProfileConfig(num_samples=2, seq_len=32), progress=False)
        for method in SEEDS:
            model = make_tiny(arch)
            ad = get_adapter(model.config)
            E = ad.num_experts(model.config)
            shared = {k: v.clone() for k, v in model.state_dict().items() if "shared" in k}
            r = prune(model, tokenizer, PruneConfig(0.5, method, **{**SMALL, "calib_samples": 2, "seq_len": 32}),
                      profile=prof)
            assert ad.num_experts(model.config) == E // 2 == r.num_experts_after
            for k, v in shared.items():  # shared experts and their gate are never touched
                assert torch.equal(model.state_dict()[k], v), (arch, k)
            if method == "stun":  # 2:4 inside every kept expert
                from compressed_tensors.utils.helpers import tensor_follows_mask_structure

                layer = ad.moe_layer_indices(model)[0]
                e = int(next(iter(r.extra["stun"]["zeroed_share"][str(layer)])))  # not a Super Expert
                w = expert_weights(ad.experts_of(ad.block_of(ad.layers(model)[layer])), e)
                assert all(tensor_follows_mask_structure(w[k].contiguous(), "2:4") for k in ("gate_proj", "up_proj", "down_proj"))
            out = save_pruned(model, tokenizer, r, tmp_path / f"{arch}-{method}")
            report = json.loads((out / "prune_report.json").read_text())
            assert report["config"]["method"] == method and method in report["details"]
            with torch.no_grad():
                expected[f"{arch}-{method}"] = model(input_ids=torch.arange(32).reshape(2, 16) % 250).logits[0, :3, :8]
            paths[f"{arch}-{method}"] = str(out)
            layer = ad.moe_layer_indices(model)[0]
            ex = ad.experts_of(ad.block_of(ad.layers(model)[layer]))
            expected[f"{arch}-{method}/shapes"] = {f"{ad.block_path(layer)}.{ad.experts}.{n}": list(p.shape)
                                                   for n, p in ex.named_parameters()}
    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(paths)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in paths:
        got = fresh[name]
        assert got["modules"] == []  # stock transformers alone
        for k, shape in expected[f"{name}/shapes"].items():
            assert got["shapes"][k] == shape, (name, k)
        np.testing.assert_allclose(got["logits"], expected[name].numpy(), rtol=1e-4, atol=1e-5)


# ---- refused up front ------------------------------------------------------------------------------
def test_bad_requests_are_refused_before_anything_changes(tokenizer, tiny_dir, tmp_path, capsys):
    from secompress.cli import main

    model = make_tiny("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("premoe", "uncurl"):  # a task with too few tokens: 4 x 64 = 256 < 1000
        with pytest.raises(ValueError, match="256 tokens, fewer than task_min_tokens=1000"):
            prune(model, tokenizer, PruneConfig(0.5, method, **{**SMALL, "task_min_tokens": 1000}))
    for method in SEEDS:  # 8 -> 1 expert with top_k 2
        with pytest.raises(ValueError, match="fewer than top_k"):
            prune(model, tokenizer, PruneConfig(0.9, method, **SMALL))
    with pytest.raises(ValueError, match="2:4"):
        prune(model, tokenizer, PruneConfig(0.5, "stun", stun_sparsity=0.3, **SMALL))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    ad = get_adapter(model.config)  # one layer's experts narrower than the others (and the config)
    keep_layer_neurons(ad.experts_of(ad.block_of(model.model.layers[2])), torch.arange(16).repeat(8, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("uncurl", "dern", "stun"):
        with pytest.raises(ValueError, match=r"experts of one width: layer 2's routed experts are \[16\] neurons"):
            prune(model, tokenizer, PruneConfig(0.5, method, **SMALL))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    out = tmp_path / "o"
    assert main(["prune", str(tiny_dir("qwen3_moe")), "--ratio", "0.5", "--method", "premoe", "--out", str(out),
                 "--num-samples", "2", "--seq-len", "32"]) == 2
    assert "task_min_tokens" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(tiny_dir("qwen3_moe")), "--ratio", "0.5", "--method", "stun", "--option", "nope=1",
                 "--out", str(out)]) == 2
    assert "KEY one of" in capsys.readouterr().err and not out.exists()


def test_uncurl_adaptive_counts_run_in_memory_and_are_refused_at_export(tokenizer, tmp_path):
    from secompress.data import load_calibration
    from secompress.prune.task_jobs import uncurl_adaptive

    model = make_tiny("qwen3_moe")  # seed 0: the eigengap estimates differ between layers
    cfg = PruneConfig(0.5, "uncurl", **SMALL)
    task = load_calibration("builtin", tokenizer, 4, 64)
    rep = uncurl_adaptive(model, tokenizer, cfg, task)
    counts = rep["experts_per_layer"]
    ad = get_adapter(model.config)
    assert sum(counts.values()) == 4 * len(counts) and len(set(counts.values())) > 1  # the uniform budget, shared
    for l, c in counts.items():
        assert ad.router_of(ad.block_of(model.model.layers[int(l)])).weight.shape[0] == c >= 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 256, (1, 16))).logits).all()
    uniform = prune(make_tiny("qwen3_moe"), tokenizer, cfg, data=task)  # the registered method: uniform, reported
    assert uniform.extra["uncurl"]["adaptive_counts_same_budget"] == counts
    assert uniform.extra["uncurl"]["eigengap_estimate"] == rep["eigengap_estimate"]
    with pytest.raises(Exception, match="different expert counts"):
        save_pruned(model, tokenizer, dataclasses.replace(uniform, num_experts_after=max(counts.values())),
                    tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- PreMoe: one variant per task, the pattern index, retrieval ---------------------------------
def _task_files(tmp_path):
    g = np.random.default_rng(0)
    digits = "".join(g.choice(list("0123456789+-*/= ()"), 6000))  # two kinds of text that route apart
    letters = "".join(g.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ ,."), 6000))
    files = {}
    for name, text in (("math", digits), ("caps", letters)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(json.dumps({"text": text[:5000]}) + "\n")
        (tmp_path / f"{name}-query.txt").write_text(text[5000:5300])
    return files


def test_premoe_variants_index_and_retrieval(tokenizer, tiny_dir, tmp_path, capsys):
    from secompress.checkpoints import load_model
    from secompress.cli import main
    from secompress.prune.task_jobs import INDEX_NAME, select_variant

    files = _task_files(tmp_path)
    out = tmp_path / "variants"
    assert main(["premoe", str(tiny_dir("qwen3_moe")), "--task", f"math={files['math']}", "--task",
                 f"caps={files['caps']}", "--ratio", "0.5", "--num-samples", "8", "--seq-len", "64",
                 "--task-min-tokens", "256", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "premoe_index.json" in printed and "  math/: " in printed and "x the checkpoint's" in printed  # sizes
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["tasks"]) == {"math", "caps"} and index["match"] == "first"
    assert index["tasks"]["math"]["kept"] != index["tasks"]["caps"]["kept"]  # task-specific patterns
    for name in ("math", "caps"):
        m = load_model(out / name)
        assert m.config.num_experts == 4
        tc = np.asarray(index["tasks"][name]["tcess"]["0"])
        assert sorted(index["tasks"][name]["kept"]["0"]) == sorted(np.argsort(-tc, kind="stable")[:4].tolist())
    original = load_model(tiny_dir("qwen3_moe"))
    for name in ("math", "caps"):
        query = (tmp_path / f"{name}-query.txt").read_text()
        assert select_variant(out, query)[0] == name  # the first MoE layer's pattern, through a pruned variant
        assert select_variant(out, query, model=original, match="all")[0] == name
        assert main(["premoe-select", str(out), "--prompt", str(tmp_path / f"{name}-query.txt")]) == 0
        assert capsys.readouterr().out.startswith(f"{name}\t")
    assert main(["premoe", str(tiny_dir("qwen3_moe")), "--task", f"math={files['math']}", "--ratio", "0.5",
                 "--num-samples", "2", "--seq-len", "32", "--out", str(tmp_path / "few")]) == 2  # 64 < 2048 tokens
    assert "task_min_tokens" in capsys.readouterr().err and not (tmp_path / "few").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_task_specific_pruning_composes_with_quantization_in_one_recipe(tmp_path, tokenizer, monkeypatch, streaming):
    from secompress.recipe.run import run_recipe
    from secompress.recipe.schema import parse_recipe
    from secompress.testing import plant_super_expert, save_tiny

    import secompress

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    m = make_tiny("qwen3_moe")
    plant_super_expert(m, layer=1, expert=3)
    path = save_tiny(m, tmp_path / "tiny")
    task = _task_files(tmp_path)["math"]
    text = f"""\
version: 1
name: tiny-premoe
model: {{id: {path}, model_type: qwen3_moe, streaming: {str(streaming).lower()}}}
data: {{calibration: {task}, num_samples: 4, seq_len: 64, batch_size: 4, eval_samples: 2}}
stages:
  - profile: {{}}
  - prune: {{ratio: 0.5, method: premoe, task_min_tokens: 128}}
  - quantize: {{method: rtn, bits: 4, group_size: 32, symmetric: true}}
  - evaluate: {{perplexity: true}}
  - export: {{}}
"""
    if not streaming:  # task data below task_min_tokens: refused before the model is loaded or profiled
        short = text.replace("task_min_tokens: 128", "task_min_tokens: 100000")
        with pytest.raises(ValueError, match="task_min_tokens=100000"):
            run_recipe(parse_recipe(short, "t.yaml"), short, tmp_path / "short", progress=False)
        assert not (tmp_path / "short").exists() and not (tmp_path / "cache").exists()
    res = run_recipe(parse_recipe(text, "t.yaml"), text, tmp_path / "out", progress=False)
    report = json.loads((res.out / "model" / "prune_report.json").read_text())
    assert report["config"]["method"] == "premoe" and "premoe" in report["details"]
    kept1 = next(l["kept"] for l in report["layers"] if l["layer"] == 1)
    assert 3 in kept1 and len(kept1) == 4  # the SE survived, renumbered
    plan = json.loads((res.out / "model" / "quantization_plan.json").read_text())
    assert plan["super_experts"] == [{"layer": 1, "expert": kept1.index(3)}]  # and stayed 16-bit
    q = secompress.load(res.out / "model")
    with torch.no_grad():
        assert torch.isfinite(q(input_ids=torch.randint(0, 256, (1, 16))).logits).all()


# ---- both layer sources: streamed from the shards = in memory ------------------------------------
@pytest.mark.parametrize("model_type,method", [("qwen3_moe", "premoe"), ("deepseek_v3", "uncurl"),
                                               ("gpt_oss", "dern"), ("qwen2_moe", "stun")])
def test_streamed_seed_method_equals_in_memory(tmp_path, model_type, method):
    from test_streamed_merge import B, N, S, _same_report, _setup, _tensors
    from test_streamed import streamed

    from secompress.compress import Job

    src, tok, calib, model, prof = _setup(tmp_path, model_type)
    pc = PruneConfig(0.5, method, calib_samples=N, eval_samples=0, seq_len=S, batch_size=B, task_min_tokens=32)
    r = prune(model, tok, pc, profile=prof, data=calib)
    save_pruned(model, tok, r, tmp_path / "mem")
    plan, go = streamed(src, Job(prune=pc, batch_size=B), prof, calib=calib.input_ids)
    res = go(None, tmp_path / "str", tok, progress=False)
    _same_report(r, res.prune_result(prof, calib.source))
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) == {s.name for s in plan.out_specs}
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["dern", "stun"])
def test_seed_method_and_quantization_in_one_pass_streamed_equals_resident(tmp_path, method):
    """A weight-changing seed method and RTN share one pass: which experts stay is decided in the pass, so
    the plan protects the SE's whole layer until then and names the SE by its new id after; streamed from
    the shards = the same job over the model in memory, tensor for tensor; the SE reloads bit-identical."""
    from test_streamed import streamed
    from test_streamed_merge import B, N, S, _setup, _tensors

    import secompress
    from secompress.compress import Job, plan_job, run_job
    from secompress.pipeline import Resident
    from secompress.quant.api import QuantConfig
    from secompress.source import Source
    from secompress.testing import plant_super_expert

    def plant(m):
        plant_super_expert(m, 1, 3, scale=300.0)

    src, tok, calib, model, prof = _setup(tmp_path, "qwen3_moe", plant)
    assert prof.se_ids() == [(1, 3)]
    opts = {"dern_threshold": -1.0} if method == "dern" else {}  # every dropped neuron recombined somewhere
    pc = PruneConfig(0.5, method, calib_samples=N, eval_samples=0, seq_len=S, batch_size=B, task_min_tokens=32, **opts)
    job = Job(prune=pc, quant=QuantConfig(bits=4, group_size=8, symmetric=True), batch_size=B)
    plan, go = streamed(src, job, prof, calib=calib.input_ids)
    assert plan.quant_plan.super_experts == [(1, None)]  # the layer, until the pass decides who stays
    res = go(None, tmp_path / "str", tok, progress=False)
    mplan = plan_job(Source.open(src, dtype=torch.float32, device="cpu"), job, prof, calib=calib.input_ids)
    res_m = run_job(mplan, Resident(model), None, tmp_path / "mem", tok, progress=False)
    kept = res.prune_step.kept[1]
    assert kept == res_m.prune_step.kept[1] and 3 in kept
    new = kept.index(3)
    assert plan.quant_plan.super_experts == mplan.quant_plan.super_experts == [(1, new)]
    assert all(plan.quant_plan.bits[n] is None for n, u in plan.quant_plan.units.items()
               if u.layer == 1 and u.expert is not None)  # the SE's layer stays 16-bit
    assert any(b == 4 for n, b in plan.quant_plan.bits.items() if plan.quant_plan.units[n].layer != 1)
    js, jm = res.prune_result(prof, calib.source).to_json(), res_m.prune_result(prof, calib.source).to_json()
    for k in ("layers", "details", "parameters", "num_experts_after", "removed_super_experts"):
        assert js[k] == jm[k], k
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) and any(k.endswith("weight_packed") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    back = secompress.load(tmp_path / "str")
    ad = get_adapter(back.config)
    src_model = make_tiny("qwen3_moe", num_hidden_layers=3)
    plant(src_model)
    se = expert_weights(ad.experts_of(ad.block_of(ad.layers(src_model)[1])), 3)
    after = expert_weights(ad.experts_of(ad.block_of(ad.layers(back)[1])), new)
    for k, v in se.items():
        assert torch.equal(after[k], v), k
    d = res.prune_result(prof, calib.source).extra[method]
    if method == "dern":  # segments were recombined into the other kept experts of the SE's layer, none into it
        rec = d["layers"]["1"]["recombination"]
        per = rec["segments_per_retained_expert"]  # keyed by original id
        assert rec["assigned"] == rec["segments"] > 0 and "3" not in per and set(per) == {str(e) for e in kept if e != 3}
    else:  # the other kept experts of the SE's layer were Wanda-pruned, the SE not
        assert str(new) not in d["zeroed_share"]["1"] and len(d["zeroed_share"]["1"]) == len(kept) - 1
