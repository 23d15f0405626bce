"""DERN per MoE layer: statistics -> decision -> applied to the layer.

    stats = SeedStats(E, frozenset(STATS))                      # one layer's routing (.seed_stats)
    d = decide_dern(stats, experts, plan, protected={3})        # drop by router statistics, assign segments
    apply_dern(block, adapter, d, stats.freq, path)             # merge segments, keep the retained experts
    finish_dern(model, adapter, plan)                           # the expert count in the config

The method (:mod:`secompress.prune.methods.dern`) runs these per layer in a pass over any layer source.

Criterion: :mod:`secompress.prune.dern_math` (Zhou et al. 2025, arXiv 2509.10377). The statistics
are the original model's routing weights on the calibration tokens (the hidden states *entering*
each layer in the original model); the decision also reads the layer's expert weights (segment
similarity), so a layer-by-layer engine decides with the layer materialised. Each retained expert
keeps its width I, so the config stays stock. With protection a Super Expert is never dropped and
never receives a segment: bit-identical. Legend: E experts before, K retained, I neurons.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_weights, write_expert
from .dern_math import Segment, assign_segments, merge_segments, recombination_summary
from .premoe import keep_by_score
from .seed_stats import SeedStats
from .select import PrunePlan
from .structural import keep_layer_experts, set_expert_count

STATS = ("routing",)


@dataclass(frozen=True)
class DernDecision:
    retained: tuple[int, ...]  # original ids, ascending
    dropped: tuple[int, ...]
    segments: tuple[Segment, ...]
    router_score: tuple[float, ...]  # [E] routing-weight sums the drop was decided on
    receivers_excluded: tuple[int, ...] = ()  # protected experts no segment may join

    def to_json(self) -> dict:
        return {"retained": list(self.retained), "dropped": list(self.dropped),
                "router_score": [round(s, 4) for s in self.router_score],
                "recombination": recombination_summary(self.segments)}

    def receivers(self) -> set[int]:
        return {s.target for s in self.segments if s.target is not None}


@torch.no_grad()
def decide_dern(stats: SeedStats, experts: nn.Module, plan: PrunePlan, protected=frozenset(), protect: bool = True,
                threshold: float = 0.0) -> DernDecision:
    """Drop the experts with the smallest routing-weight sums (protected ones never), then assign every
    dropped neuron to the most similar neuron of a retained, unprotected expert."""
    score = stats.gate_sum.numpy()
    keep = keep_by_score(score, plan, protected, protect)
    retained = keep.keep
    dropped = tuple(e for e in range(plan.num_experts) if e not in retained)
    excluded = tuple(sorted(set(protected) & set(retained))) if protect else ()
    receivers = {r: expert_weights(experts, r) for r in retained if r not in excluded}
    segs = assign_segments({d: expert_weights(experts, d) for d in dropped}, receivers, threshold)
    return DernDecision(retained, dropped, tuple(segs), tuple(float(s) for s in score), excluded)


@torch.no_grad()
def apply_dern(block: nn.Module, adapter: MoEAdapter, decision: DernDecision, freq: torch.Tensor,
               path: str = "") -> list[int]:
    """Merge each retained expert's segments into it (frequency-weighted), then keep the retained."""
    experts = adapter.experts_of(block)
    by_target: dict[int, list[Segment]] = {}
    for s in decision.segments:
        if s.target is not None:
            by_target.setdefault(s.target, []).append(s)
    sources = {d: {k: v.clone() for k, v in expert_weights(experts, d).items()} for d in decision.dropped}
    for r, segs in sorted(by_target.items()):
        base = {k: v.clone() for k, v in expert_weights(experts, r).items()}
        merged = merge_segments(base, float(freq[r]),
                                [(s.target_neuron, sources[s.source], s.neuron, float(freq[s.source])) for s in segs])
        write_expert(experts, r, merged)
    keep = list(decision.retained)
    keep_layer_experts(block, adapter, keep, path)
    return keep


def finish_dern(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> None:
    set_expert_count(model, adapter, plan.num_keep)
