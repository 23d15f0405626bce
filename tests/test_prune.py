import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ARCHS
from secompress import ProfileConfig, profile, save_profile
from secompress.ablate import mask_experts
from secompress.adapters import get_adapter
from secompress.cli import main
from secompress.prune import SCORERS, PruneConfig, prune, save_pruned, select_by_score
from secompress.prune import scores as scores_mod
from secompress.prune.api import REPORT_NAME, plan_for
from secompress.prune.reconstruction import block_loss, block_outputs, capture_block_inputs, search
from secompress.prune.select import make_plan
from secompress.prune.structural import remove_experts
from secompress.testing import make_tiny, plant_super_expert

SMALL = dict(calib_samples=4, eval_samples=2, seq_len=48, batch_size=4)


# ---- scorers (pure) ----------------------------------------------------------------------------
def _stats():
    tokens = np.array([[100, 1, 10, 20], [-1, -1, -1, -1]], dtype=float)  # second row: a dense layer
    gated = np.array([[50.0, 3.0, 8.0, 4.0], [np.nan] * 4])
    return {"tokens": tokens, "gated_norm_sum": gated}


@pytest.mark.parametrize("method,order", [
    ("frequency", [1, 2, 3, 0]),  # tokens 100, 1, 10, 20
    ("reap", [3, 0, 2, 1]),  # mean gated norm 0.5, 3.0, 0.8, 0.2
    ("easy_ep", [1, 3, 2, 0]),  # summed gated norm 50, 3, 8, 4
])
def test_scorers_rank_hand_made_statistics(method, order):
    s = SCORERS[method](_stats(), 0)
    assert list(np.argsort(s[0], kind="stable")) == order
    assert np.isnan(s[1]).all()  # dense layer: no score


def test_reap_values_and_never_routed_expert():
    st = {"tokens": np.array([[4.0, 0.0]]), "gated_norm_sum": np.array([[2.0, 0.0]])}
    np.testing.assert_allclose(SCORERS["reap"](st, 0), [[0.5, 0.0]])


def test_random_scorer_is_seeded_and_registry_rejects_duplicates():
    a, b, c = (SCORERS["random"](_stats(), s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="already registered"):
        scores_mod.register("reap")(lambda stats, seed: stats["tokens"])


# ---- selection (pure) --------------------------------------------------------------------------
def test_selection_spares_se_and_records_the_change():
    scores = np.array([[5.0, 0.1, 3.0, 0.2, 4.0, 6.0, 7.0, 8.0]])  # expert 1 lowest, then 3, 2, 4
    plan = make_plan(0.25, 8, 2)  # remove 2
    sel = select_by_score(scores, plan, [0], protected=[(0, 1), (0, "shared")])
    assert sel.removed[0] == [2, 3]
    (ch,) = sel.protection_changes
    assert ch.layer == 0 and ch.spared == (1,) and ch.removed_instead == (2,)
    unprotected = select_by_score(scores, plan, [0], protected=[(0, 1)], protect=False)
    assert unprotected.removed[0] == [1, 3] and unprotected.protection_changes == []


def test_grouped_selection_removes_equally_from_each_group():
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0]])  # group 0 holds all the low scores
    sel = select_by_score(scores, make_plan(0.5, 8, 2, (2, 1), 2), [0])
    assert sel.removed[0] == [0, 1, 4, 5]


# ---- SE protection on a real model -------------------------------------------------------------
def _low_frequency_se_model():
    """qwen3_moe with a Super Expert at (1, 3) whose router row points away from the mean hidden state."""
    model = make_tiny("qwen3_moe")
    ad = get_adapter(model.config)
    plant_super_expert(model, 1, 3)
    with capture_block_inputs(model, ad, [1]) as cap, torch.no_grad():
        model(input_ids=torch.randint(0, 256, (4, 64)))
    mu = cap[1][0].reshape(-1, model.config.hidden_size).mean(0)
    router = ad.router_of(ad.block_of(ad.layers(model)[1]))
    with torch.no_grad():
        router.weight[3] = -0.5 * router.weight.norm(dim=1).mean() * mu / mu.norm()
    return model


def test_planted_lowest_frequency_super_expert_survives_half_pruning(tokenizer):
    model = _low_frequency_se_model()
    prof = profile(model, tokenizer, config=ProfileConfig(num_samples=6, seq_len=64, batch_size=3), progress=False)
    tokens = prof.arrays["tokens"][1, :8]
    assert prof.se_ids() == [(1, 3)] and int(np.argmin(tokens)) == 3 and tokens[3] > 0  # the premise
    unprotected = prune(copy.deepcopy(model), tokenizer, PruneConfig(0.5, "frequency", protect_super_experts=False,
                                                                     **SMALL), profile=prof)
    assert 3 in unprotected.removed[1] and unprotected.removed_super_experts == [(1, 3)]
    result = prune(model, tokenizer, PruneConfig(0.5, "frequency", **SMALL), profile=prof)
    assert 3 in result.kept[1] and 3 not in result.removed[1] and len(result.kept[1]) == 4
    assert result.removed_super_experts == []
    (ch,) = result.protection_changes
    assert ch.layer == 1 and ch.spared == (3,) and len(ch.removed_instead) == 1
    assert ch.removed_instead[0] not in unprotected.removed[1]
    # the SE still emits its outlier in the pruned model: its new index is its rank among the kept
    new = result.kept[1].index(3)
    experts = get_adapter(model.config).experts_of(get_adapter(model.config).block_of(model.model.layers[1]))
    assert experts.down_proj[new].abs().max() > 10 * experts.down_proj[(new + 1) % 4].abs().max()


# ---- every architecture: prune, exactness, save, reload in a fresh process -------------------
_FRESH = r"""
import hashlib, json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
out = {}
for arch, path in json.loads(sys.argv[1]).items():
    m = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.arange(2 * 24).reshape(2, 24) % 250
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    out[arch] = {"shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
                 "logits": logits[0, :4, :8].tolist(),
                 "hashes": {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                            for k, v in m.state_dict().items()}}
print(json.dumps(out))
"""


def _sha(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _router_indices(model, ids):
    ad = get_adapter(model.config)
    seen, handles = [], []
    for l in ad.moe_layer_indices(model):
        router = ad.router_of(ad.block_of(ad.layers(model)[l]))
        handles.append(router.register_forward_hook(lambda m, a, o: seen.append(o[-1])))  # (logits, w, idx)
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return torch.cat([s.reshape(-1) for s in seen])


def test_every_architecture_prunes_exactly_saves_and_reloads_in_a_fresh_process(tokenizer, tmp_path):
    ids = torch.randint(0, 256, (2, 40))
    paths, expected = {}, {}
    for arch in ARCHS:
        model = make_tiny(arch)
        ad = get_adapter(model.config)
        original = copy.deepcopy(model)
        E, k = ad.num_experts(model.config), ad.top_k(model.config)
        result = prune(model, tokenizer, PruneConfig(0.5, "reap", **SMALL))
        E2 = E // 2
        assert result.num_experts_after == E2 and ad.num_experts(model.config) == E2
        assert result.params_saved > 0 and result.bytes_saved > 0
        assert math.isfinite(result.perplexity_before) and math.isfinite(result.perplexity_after)
        for l in ad.moe_layer_indices(model):
            kept = torch.tensor(result.kept[l])
            new_b, old_b = (ad.block_of(ad.layers(m)[l]) for m in (model, original))
            ex, ox = ad.experts_of(new_b), ad.experts_of(old_b)
            assert ex.num_experts == E2 and ad.router_of(new_b).num_experts == E2
            for name, p in ox.named_parameters(recurse=False):  # every per-expert tensor, biases included
                assert torch.equal(getattr(ex, name), p[kept]), (arch, l, name)
            for name in ("weight", *ad.router_per_expert):
                assert torch.equal(getattr(ad.router_of(new_b), name), getattr(ad.router_of(old_b), name)[kept])
            if ad.shared_expert:
                for a, b in zip(ad.shared_of(new_b).parameters(), ad.shared_of(old_b).parameters()):
                    assert torch.equal(a, b)
        # the pruned model routes only among the E' kept experts, exactly as the original with the rest masked
        assert int(_router_indices(model, ids).max()) < E2
        with torch.no_grad():
            pruned_logits = model(input_ids=ids).logits
            with mask_experts(original, [(l, e) for l, es in result.removed.items() for e in es]):
                masked_logits = original(input_ids=ids).logits
        torch.testing.assert_close(pruned_logits, masked_logits, rtol=1e-4, atol=1e-4)
        out = save_pruned(model, tokenizer, result, tmp_path / arch)
        cfg = json.loads((out / "config.json").read_text())
        for _, key in ad.legacy_config_keys:
            assert cfg[key] == E2, (arch, key)
        assert [cfg[key] for key in ("num_experts", "num_local_experts", "n_routed_experts") if key in cfg] \
            in ([E2], [E2, E2]), arch  # transformers' own key too, and no stale count anywhere
        assert cfg["num_experts_per_tok"] == k
        report = json.loads((out / REPORT_NAME).read_text())
        assert report["num_experts_after"] == E2 and len(report["layers"]) == len(ad.moe_layer_indices(model))
        paths[arch] = str(out)
        with torch.no_grad():
            logits = model(input_ids=torch.arange(48).reshape(2, 24) % 250).logits
        expected[arch] = (model, logits)
    qwen3 = json.loads((tmp_path / "qwen3_moe" / "config.json").read_text())
    assert qwen3["num_experts"] == 4 and qwen3["num_local_experts"] == 4  # both spellings, new value

    proc = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(paths)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch, (model, logits) in expected.items():
        got = fresh[arch]
        assert got["shape"] == [2, 24, model.config.vocab_size] and got["finite"], arch
        np.testing.assert_allclose(got["logits"], logits[0, :4, :8].numpy(), rtol=1e-5, atol=1e-5)
        mine = {k: _sha(v) for k, v in model.state_dict().items()}
        assert got["hashes"] == mine, arch  # every tensor bit-identical after reload (kept experts included)


# ---- rejected requests: clear errors, nothing written -----------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_out_of_range_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        PruneConfig(ratio)


@pytest.mark.parametrize("arch,ratio,match", [
    ("qwen3_moe", 0.9, r"keeps 1 of 8 experts per layer, fewer than top_k=2"),
    ("deepseek_v3", 0.375, r"keeps 5 experts, not divisible by n_group=2"),
    ("deepseek_v3", 0.75, r"leaves 1 experts per group; this router needs at least 2"),
])
def test_ratio_the_router_cannot_take_is_rejected_and_nothing_is_written(arch, ratio, match, tiny_dir, tmp_path,
                                                                         tokenizer, capsys):
    model = make_tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune(model, tokenizer, PruneConfig(ratio, **SMALL))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    out = tmp_path / "out"
    assert main(["prune", str(tiny_dir(arch)), "--ratio", str(ratio), "--out", str(out)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_ratio_that_would_remove_a_super_expert_is_rejected(tiny_dir, tmp_path, tokenizer, capsys):
    path = tiny_dir("qwen3_moe")
    prof = profile(str(path), config=ProfileConfig(num_samples=4, seq_len=48, batch_size=4), progress=False)
    prof = dataclasses.replace(prof, super_experts=[(1, 0), (1, 4), (1, 6)])  # three SEs in layer 1
    model = make_tiny("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 1 has 3 Super Experts \[0, 4, 6\] but ratio 0.75 keeps only 2"):
        prune(model, tokenizer, PruneConfig(0.75, **SMALL), profile=prof)
    with pytest.raises(ValueError, match="Super Experts"):
        prune(model, tokenizer, PruneConfig(0.75, "naee", **SMALL), profile=prof)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert get_adapter(model.config).num_experts(model.config) == 8
    save_profile(prof, tmp_path / "prof", plots=False)
    out = tmp_path / "out"
    args = ["prune", str(path), "--ratio", "0.75", "--profile", str(tmp_path / "prof"), "--out", str(out),
            "--num-samples", "4", "--eval-samples", "2", "--seq-len", "48"]
    assert main(args) == 2
    assert "Super Experts" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--no-protect-super-experts"]) == 0  # explicit opt-out: the same request goes through
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["num_experts_after"] == 2 and report["config"]["protect_super_experts"] is False


def test_cli_prunes_and_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", str(tiny_dir("deepseek_v2")), "--ratio", "0.25", "--method", "easy_ep", "--out", str(out),
            "--num-samples", "4", "--eval-samples", "2", "--seq-len", "48"]
    assert main(args) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["num_experts_after"] == 6 and report["parameters"]["saved"] > 0
    assert all(len(x["kept"]) == 6 and len(x["removed"]) == 2 for x in report["layers"])
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


# ---- NAEE --------------------------------------------------------------------------------------
def test_search_enumerates_where_greedy_is_trapped():
    single = {(0,): 1.0, (1,): 2.0, (2,): 2.0, (3,): 2.0}
    pairs = {(0, 1): 10.0, (0, 2): 10.0, (0, 3): 10.0, (1, 2): 3.0, (1, 3): 5.0, (2, 3): 5.0}
    loss = lambda s: {**single, **pairs}[s]
    plan = make_plan(0.5, 4, 1)
    assert search(loss, plan).removed == (1, 2) and search(loss, plan).exhaustive
    greedy = search(loss, plan, limit=1)
    assert not greedy.exhaustive and greedy.removed == (0, 1) and greedy.loss == 10.0
    spared = search(loss, plan, protected={2})
    assert spared.removed == (1, 3) and spared.unprotected == (1, 2)


def test_naee_enumeration_finds_the_optimal_subset_of_a_real_layer(tokenizer):
    model = make_tiny("qwen3_moe")
    ad = get_adapter(model.config)
    layer, plan = 2, plan_for(model, 0.5)  # C(8, 4) = 70 subsets
    with capture_block_inputs(model, ad, [layer]) as cap, torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 32)))
    xs = cap[layer]
    ref = block_outputs(ad.block_of(ad.layers(model)[layer]), xs)

    def pruned_loss(removed):  # independent of masking: remove the experts for real from a copy
        m = copy.deepcopy(model)
        remove_experts(m, ad, {l: (list(removed) if l == layer else list(range(4)))
                               for l in ad.moe_layer_indices(m)})
        y = block_outputs(ad.block_of(ad.layers(m)[layer]), xs)
        return sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(y, ref)) / (2 * 32)

    masked = lambda s: block_loss(model, ad, layer, xs, ref, s)
    best = search(masked, plan)
    truth = {s: pruned_loss(s) for s in itertools.combinations(range(8), 4)}
    optimum = min(truth, key=truth.get)
    assert best.exhaustive and best.removed == optimum
    assert abs(best.loss - truth[optimum]) <= 1e-6 * max(1.0, truth[optimum])
    greedy = search(masked, plan, limit=1)
    assert greedy.loss >= best.loss - 1e-12
