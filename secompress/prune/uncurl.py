"""UNCURL expert reduction per MoE layer: statistics -> decision -> applied to the layer.

    stats = SeedStats(E, frozenset(STATS))                  # one layer, the task's tokens (.seed_stats)
    d = decide_uncurl(stats, plan, protected={3})           # spectral clusters of router logits (pure)
    apply_uncurl(block, adapter, d, stats.freq, path)       # align + merge, keep representatives
    finish_uncurl(model, adapter, plan.num_keep)            # the expert count in the config

The threshold pruning factor (the reduction above which task quality drops) is a sweep of whole
runs: :func:`secompress.prune.task_jobs.uncurl_threshold`.

Criterion: :mod:`secompress.prune.uncurl_math` (Sarkar et al. 2024, arXiv 2409.01483). The
statistics are the original model's router logits and routing counts on the task's tokens (the
hidden states *entering* each layer in the original model, as merging decides everywhere here).

**Per-layer counts.** The method (:mod:`secompress.prune.methods.uncurl`) keeps ``plan.num_keep``
experts in every layer, the count a stock transformers config can hold, so the result exports,
streams and reloads anywhere; its report gives each layer's eigengap estimate and the adaptive
counts the same budget would give (:func:`adaptive_counts`). Applying adaptive counts
(:func:`secompress.prune.task_jobs.uncurl_adaptive`) leaves a different count in each layer of the
model in memory (each module carries its own), which evaluates, but is **not exported**: a config
has one ``num_experts``, and padding the short layers with masked experts cannot be expressed in
stock routers without a bias (Qwen3-MoE, Mixtral, OLMoE: a zero router row still wins top-k slots),
so ``save_pruned`` refuses it with the counts named. Legend: E experts before, K kept.
"""
from __future__ import annotations

from torch import nn

from ..adapters import MoEAdapter
from .merge import MergeDecision
from .merging import apply_merge, merge_targets
from .seed_stats import SeedStats
from .select import PrunePlan
from .structural import set_expert_count
from .uncurl_math import allocate_counts, eigengap_count, logit_affinity, uncurl_groups

STATS = ("routing", "gram")


def decide_uncurl(stats: SeedStats, plan: PrunePlan, protected=frozenset(), keep: int | None = None,
                  seed: int = 0) -> MergeDecision:
    """UNCURL's clusters of one layer into ``keep`` experts (default ``plan.num_keep``; per routing
    group an equal share)."""
    targets = merge_targets(plan) if keep is None else [keep // plan.n_group] * plan.n_group
    return uncurl_groups(stats.freq, stats.gram, targets, plan.groups(), set(protected), seed)


def estimate_count(stats: SeedStats, plan: PrunePlan, protected=frozenset()) -> int:
    """The cluster count the layer's routing supports by the eigengap, in [top_k, E - 1], counting
    protected experts as clusters of their own."""
    free = [e for e in range(plan.num_experts) if e not in protected]
    aff = logit_affinity(stats.gram)[free][:, free]
    lo = max(1, plan.top_k - len(protected))
    return eigengap_count(aff, lo, len(free) - 1) + len(protected)


def adaptive_counts(estimates: dict[int, int], plan: PrunePlan, protected: dict[int, set[int]]) -> dict[int, int]:
    """Per-layer counts with the uniform total (``plan.num_keep`` per layer), shared out in proportion
    to the layers' eigengap ``estimates``; each at least top_k and every protected expert plus one, at
    most E - 1."""
    if plan.n_group > 1:
        raise ValueError("UNCURL adaptive counts keep routing groups equal only with one group (n_group 1)")
    layers = sorted(estimates)
    lo = [max(plan.top_k, len(protected.get(l, ())) + 1) for l in layers]
    counts = allocate_counts([estimates[l] for l in layers], plan.num_keep * len(layers), lo, plan.num_experts - 1)
    return dict(zip(layers, counts))


def apply_uncurl(block: nn.Module, adapter: MoEAdapter, decision: MergeDecision, freq, path: str = "") -> list[int]:
    """Members permutation-aligned onto their representative and averaged by routing frequency; the
    layer keeps the representatives (their router rows)."""
    return apply_merge(block, adapter, decision, freq, True, path)


def finish_uncurl(model: nn.Module, adapter: MoEAdapter, count: int) -> None:
    """The model's and the config's expert count (adaptive counts: the largest layer's)."""
    set_expert_count(model, adapter, count)
