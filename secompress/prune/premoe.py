"""PreMoe expert pruning per MoE layer: statistics -> decision -> applied to the layer.

    stats = SeedStats(E, frozenset(STATS), tcess_k=k, tcess_r=r)   # one layer, task tokens (.seed_stats)
    d = decide_premoe(stats, plan, protected={3})                   # keep the highest TCESS (pure)
    apply_premoe(block, adapter, d, path)                           # that layer's experts, in place
    finish_premoe(model, adapter, plan)                             # the expert count in the config

The method (:mod:`secompress.prune.methods.premoe`) runs these per layer in a pass over any layer
source; ``prune(model, ..., PruneConfig(0.5, "premoe"), data=TASK)`` is the in-memory call.

Criterion: :mod:`secompress.prune.premoe_math` (Pei et al. 2025, arXiv 2505.17639). The statistics
are the original model's routing on the task's tokens (the hidden states *entering* each layer in
the original model): TCESS describes the router the deployed variant keeps. Every layer keeps the
same number of experts (one count per config). A protected Super Expert is always kept; the expert
it displaces is recorded. Several tasks, one variant each, and the retrieval index:
:mod:`secompress.prune.task_jobs`. Legend: E experts before, K kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..adapters import MoEAdapter
from .seed_stats import SeedStats
from .select import PrunePlan, select_by_score
from .structural import keep_layer_experts, set_expert_count

STATS = ("routing", "tcess")


@dataclass(frozen=True)
class KeepDecision:
    """One layer's choice: ``keep`` (original ids, ascending), the criterion per expert, and the
    Super Experts protection kept that the criterion alone would have removed (with their stand-ins)."""

    keep: tuple[int, ...]
    scores: tuple[float, ...]
    spared: tuple[int, ...] = ()
    removed_instead: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"kept": list(self.keep), "scores": [round(s, 6) for s in self.scores],
                **({"super_experts_spared": list(self.spared), "removed_instead": list(self.removed_instead)}
                   if self.spared else {})}


def keep_by_score(scores, plan: PrunePlan, protected=frozenset(), protect: bool = True) -> KeepDecision:
    """The ``plan.num_keep`` highest-scoring experts of one layer (per routing group), protected ones
    always (pure; ties remove the lower id first, as :func:`select_by_score`)."""
    row = np.asarray(scores, dtype=np.float64)[None, :]  # [1, E]
    sel = select_by_score(row, plan, [0], [(0, int(e)) for e in protected], protect)
    gone = set(sel.removed[0])
    ch = sel.protection_changes[0] if sel.protection_changes else None
    return KeepDecision(tuple(e for e in range(plan.num_experts) if e not in gone), tuple(float(s) for s in row[0]),
                        ch.spared if ch else (), ch.removed_instead if ch else ())


def decide_premoe(stats: SeedStats, plan: PrunePlan, protected=frozenset(), protect: bool = True) -> KeepDecision:
    """PreMoe's probabilistic expert pruning of one layer: keep the highest TCESS."""
    return keep_by_score(stats.tcess().numpy(), plan, protected, protect)


def apply_premoe(block: nn.Module, adapter: MoEAdapter, decision: KeepDecision, path: str = "") -> list[int]:
    keep = list(decision.keep)
    keep_layer_experts(block, adapter, keep, path)
    return keep


def finish_premoe(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> None:
    set_expert_count(model, adapter, plan.num_keep)
