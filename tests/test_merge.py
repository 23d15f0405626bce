"""Expert merging (M-SMoE, HC-SMoE), HEAPr neuron pruning and the sink-health gate."""
import copy
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
from secompress.prune.heapr import massive_neurons, nonuniform_widths, select_neurons
from secompress.prune.merge import align_permutation, hcsmoe_groups, merge_weights, msmoe_groups, permute_neurons
from secompress.prune.structural import remove_experts
from secompress.sink import SinkHealthError, check_sink, measure_sink
from secompress.testing import TINY, make_tiny, plant_super_expert

from test_prune import _low_frequency_se_model

ARCHS = sorted(TINY)
SMALL = dict(calib_samples=2, eval_samples=0, seq_len=32, batch_size=2)


# ---- pure math -------------------------------------------------------------------------------------
def test_msmoe_groups_by_frequency_and_router_logit_similarity():
    freq = torch.tensor([10.0, 1.0, 8.0, 2.0])
    t = torch.randn(50)
    logits = torch.stack([t, t + 0.01 * torch.randn(50), -t, -t + 0.01 * torch.randn(50)], 1)  # [T, 4]
    d = msmoe_groups(freq, logits, [2], [[0, 1, 2, 3]])
    assert set(d.groups) == {(0, 1), (2, 3)} and d.representatives == [0, 2]  # 1 moves with 0, 3 with 2
    d = msmoe_groups(freq, logits, [2], [[0, 1, 2, 3]], protected={1})  # the SE stays alone, all others merge
    assert set(d.groups) == {(1,), (0, 2, 3)}
    with pytest.raises(ValueError, match="cannot leave every Super Expert alone"):
        msmoe_groups(freq, logits, [1], [[0, 1, 2, 3]], protected={1})


def test_hcsmoe_clusters_expert_outputs_with_average_linkage():
    out = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.2]])
    freq = torch.tensor([1.0, 3.0, 1.0, 1.0, 9.0])
    d = hcsmoe_groups(freq, out, [2], [list(range(5))])
    assert set(d.groups) == {(1, 0), (4, 2, 3)}  # the most routed member represents its cluster
    assert set(hcsmoe_groups(freq, out, [3], [list(range(5))], protected={4}).groups) == {(4,), (1, 0), (2, 3)}


def test_weight_matching_recovers_a_permutation_and_frequency_weighted_average():
    g = torch.Generator().manual_seed(0)
    w = {"gate_proj": torch.randn(6, 4, generator=g), "up_proj": torch.randn(6, 4, generator=g),
         "down_proj": torch.randn(4, 6, generator=g)}
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = permute_neurons(w, perm)
    back = align_permutation(w, shuffled)
    for k in w:
        assert torch.equal(permute_neurons(shuffled, back)[k], w[k])
    merged = merge_weights([w, shuffled], [3.0, 1.0], align=True)  # aligned copies average to the original
    for k in w:
        torch.testing.assert_close(merged[k], w[k])
    plain = merge_weights([w, shuffled], [3.0, 1.0], align=False)
    torch.testing.assert_close(plain["gate_proj"], 0.75 * w["gate_proj"] + 0.25 * shuffled["gate_proj"])


def test_massive_neurons_and_uniform_selection_with_protection():
    act = torch.tensor([0.1, 5.0, -0.2, 0.05, 3.0])
    row = torch.tensor([1.0, 40.0, 1.0, 1.0, -1.0])  # neuron 1 writes 200 of the channel's 196.95
    assert massive_neurons(act, row) == [1]  # within 2%
    assert massive_neurons(act, row, tol=0.01) == [1, 4]  # 197 after neuron 4's -3
    scores = torch.tensor([[5.0, 0.1, 4.0, 3.5], [1.0, 2.0, 3.0, 4.0]])
    keep = select_neurons(scores, 2, {0: [1]})
    assert keep.tolist() == [[0, 1], [2, 3]]
    assert nonuniform_widths(scores, 2).tolist() == [3, 1]
    with pytest.raises(ValueError, match="width"):
        select_neurons(scores, 0)


# ---- Super Experts on real (tiny) models --------------------------------------------------------
@pytest.mark.parametrize("method", ["m-smoe", "hc-smoe"])
def test_planted_super_expert_is_never_merged_and_stays_bit_identical(method, tokenizer):
    model = _low_frequency_se_model()  # SE (1, 3), the least routed expert of layer 1
    prof = profile(model, tokenizer, config=ProfileConfig(num_samples=4, seq_len=64, batch_size=4), progress=False)
    assert prof.se_ids() == [(1, 3)]
    ad = get_adapter(model.config)
    se_before = {k: v.clone() for k, v in expert_weights(ad.experts_of(ad.block_of(model.model.layers[1])), 3).items()}
    router_row = ad.router_of(ad.block_of(model.model.layers[1])).weight[3].clone()
    unaware = prune(copy.deepcopy(model), tokenizer, PruneConfig(0.5, method, protect_super_experts=False,
                                                                 calib_samples=4, eval_samples=0, seq_len=64),
                    profile=prof)
    r = prune(model, tokenizer, PruneConfig(0.5, method, calib_samples=4, eval_samples=0, seq_len=64), profile=prof)
    groups = [tuple(g) for g in r.extra["merge"]["groups"]["1"]]
    assert (3,) in groups and r.removed_super_experts == [] and len(groups) == 4 == r.num_experts_after
    new = r.kept[1].index(3)
    after = expert_weights(ad.experts_of(ad.block_of(model.model.layers[1])), new)
    for k, v in se_before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(ad.router_of(ad.block_of(model.model.layers[1])).weight[new], router_row)
    if method == "m-smoe":  # the least routed expert is never dominant: without protection it is merged away
        assert unaware.removed_super_experts == [(1, 3)] and 3 in unaware.removed[1]


def test_super_expert_massive_neuron_survives_half_width_heapr(tokenizer):
    model = make_tiny("qwen3_moe")
    plant_super_expert(model, 1, 3, neuron=5, scale=3000.0)
    prof = profile(model, tokenizer, config=ProfileConfig(num_samples=4, seq_len=64, batch_size=4), progress=False)
    assert prof.se_ids() == [(1, 3)]
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    before = measure_sink(model, ids)
    r = prune(model, tokenizer, PruneConfig(0.5, "heapr", calib_samples=4, eval_samples=0, seq_len=64), profile=prof)
    assert model.config.moe_intermediate_size == 16 and r.removed_super_experts == []
    kept_neurons = r.extra["heapr"]["layers"]["1"]["protected_neurons"]["3"]
    assert kept_neurons[0] == 5  # the planted neuron writes the channel
    after = measure_sink(model, ids)
    assert abs(after.hidden_max[1] - before.hidden_max[1]) <= 0.1 * before.hidden_max[1]
    assert before.hidden_max[1] > 10 * before.hidden_max[0]  # the premise: layer 1 makes the massive activation


# ---- every architecture: merged / neuron-pruned, saved, reloaded by stock transformers -----------
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


def test_every_architecture_merges_and_prunes_neurons_and_reloads_in_stock_transformers(tokenizer, tmp_path):
    paths, expected = {}, {}
    for arch in ARCHS:
        for method in ("m-smoe", "hc-smoe", "heapr"):
            if method == "hc-smoe" and arch != "deepseek_v3":
                continue  # same structural path as m-smoe; grouped routing is the case to see
            model = make_tiny(arch)
            ad = get_adapter(model.config)
            E, I = ad.num_experts(model.config), ad.intermediate_size(model.config)
            shared = {k: v.clone() for k, v in model.state_dict().items() if "shared" in k}
            r = prune(model, tokenizer, PruneConfig(0.5, method, hessian="identity", **SMALL))
            E2, I2 = (E, I // 2) if method == "heapr" else (E // 2, I)
            assert ad.num_experts(model.config) == E2 == r.num_experts_after
            assert ad.intermediate_size(model.config) == I2
            for k, v in shared.items():  # shared experts and their gate are never touched
                assert torch.equal(model.state_dict()[k], v), (arch, k)
            out = save_pruned(model, tokenizer, r, tmp_path / f"{arch}-{method}")
            report = json.loads((out / "prune_report.json").read_text())
            assert report["config"]["method"] == method and ("merge" in report["details"] or "heapr" in report["details"])
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


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_requests_are_refused_before_anything_changes(tokenizer, tiny_dir, tmp_path, capsys):
    from secompress.cli import main

    model = make_tiny("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fewer than top_k"):
        prune(model, tokenizer, PruneConfig(0.9, "m-smoe", **SMALL))  # 8 -> 1 expert, top_k 2
    with pytest.raises(ValueError, match="kept width"):
        prune(model, tokenizer, PruneConfig(0.99, "heapr", **SMALL))  # 32 -> 0 neurons
    other = profile(make_tiny("mixtral"), tokenizer, config=ProfileConfig(num_samples=2, seq_len=32), progress=False)
    with pytest.raises(Exception, match="profile is of a mixtral"):
        prune(model, tokenizer, PruneConfig(0.5, "hc-smoe", **SMALL), profile=other)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    out = tmp_path / "o"
    assert main(["prune", str(tiny_dir("qwen3_moe")), "--ratio", "0.9", "--method", "m-smoe", "--out", str(out)]) == 2
    assert "top_k" in capsys.readouterr().err and not out.exists()


# ---- sink-health gate -----------------------------------------------------------------------------
def _bos_super_expert_model(tmp_path=None):
    """qwen3_moe with a Super Expert planted in the layer-1 expert that <bos> (position 0 of every
    window) is routed to, so it writes the first token's massive activation, as real SEs do."""
    from secompress.bytetok import BOS_ID

    model = make_tiny("qwen3_moe")
    ad = get_adapter(model.config)
    seen = []
    h = ad.router_of(ad.block_of(model.model.layers[1])).register_forward_hook(lambda m, a, o: seen.append(o[-1]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[BOS_ID, 5, 6]]))
    h.remove()
    e = int(seen[0].reshape(3, -1)[0, 0])
    plant_super_expert(model, 1, e, scale=3000.0)
    return model, e


def test_sink_gate_fails_when_the_super_expert_is_removed():
    from secompress.bytetok import BOS_ID

    model, se = _bos_super_expert_model()
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS_ID
    base = measure_sink(model, ids)
    assert base.peak_ratio > 20 and np.isfinite(base.mean_sink_mass)
    others = [e for e in range(8) if e != se][:2]
    kept = copy.deepcopy(model)
    remove_experts(kept, get_adapter(kept.config), {l: others for l in range(4)})  # SE spared
    check_sink(base, measure_sink(kept, ids), 0.5)
    remove_experts(model, get_adapter(model.config), {l: [others[0], se] for l in range(4)})  # SE gone
    with pytest.raises(SinkHealthError, match="peak massive ratio"):
        check_sink(base, measure_sink(model, ids), 0.5, "SE-aware")


SINK_RECIPE = """\
version: 1
name: tiny-sink
model: {{id: {model}, model_type: qwen3_moe}}
data: {{num_samples: 2, seq_len: 64, batch_size: 2, eval_samples: 2}}
stages:
  - profile: {{}}
  - evaluate: {{perplexity: true, compare_se_unaware: false, sink_check: 0.5}}
  - export: {{}}
"""


def test_recipe_sink_check_fails_a_run_whose_super_expert_was_removed_before_writing(tmp_path, monkeypatch):
    import secompress.recipe.run as run_mod
    from secompress.recipe.schema import parse_recipe
    from secompress.testing import save_tiny

    monkeypatch.setenv("SECOMPRESS_CACHE", str(tmp_path / "cache"))
    model, se = _bos_super_expert_model()
    text = SINK_RECIPE.format(model=save_tiny(model, tmp_path / "tiny"))
    ok = run_mod.run_recipe(parse_recipe(text, "t.yaml"), text, tmp_path / "ok", progress=False)
    for f in ("sink.json", "sink.md", "sink.png"):
        assert (ok.out / f).is_file(), f
    assert "sink/peak_massive_ratio" in ok.comparison.rows
    real = run_mod.run_job

    class LoseTheSE:  # a step after the job's own: the compressed stream sees layer 1 without its SE
        def __init__(self, src):
            self.src = src

        def on_layer(self, index, layer, inputs):
            if index == 1:
                ad = self.src.adapter
                with torch.no_grad():
                    ad.experts_of(ad.block_of(layer)).down_proj[se].zero_()

    monkeypatch.setattr(run_mod, "run_job", lambda plan, src, *a, **k: real(plan, src, *a, **k,
                                                                          extra_steps=[LoseTheSE(src)]))
    with pytest.raises(SinkHealthError, match="SE-aware model lost its attention sink"):
        run_mod.run_recipe(parse_recipe(text, "t.yaml"), text, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
