"""STUN per MoE layer: two steps, each statistics -> decision -> applied to the layer.

    s1 = SeedStats(E, frozenset(stats_for("router")))               # routing (+ co-selection for "coact")
    d = decide_stun(s1, experts, router.weight, plan, {3})         # clusters, representative first
    apply_stun(block, adapter, d, path)                            # keep the representatives
    s2 = SeedStats(K, frozenset(WANDA_STATS))                      # the changed layer's expert inputs
    apply_wanda(block, adapter, s2, skip={new SE ids}, 0.5, "2:4") # zero weights inside kept experts
    finish_stun(model, adapter, plan)                              # the expert count in the config

Criterion: :mod:`secompress.prune.stun_math` (Lee et al. 2025, arXiv 2409.06211). Stage 1 decides
from the routing of the hidden states entering the layer; stage 2 (Wanda) needs the inputs that the
*changed* layer's experts receive (tokens of a removed expert now go elsewhere), so the method
(:mod:`secompress.prune.methods.stun`) reruns the layer after stage 1 on the calibration stream
propagated through the layers already pruned, as Wanda does layer by layer. An expert no calibration
token reaches in stage 2 is pruned by magnitude (Wanda with unit input norms).

**What a server can exploit.** Stage 1 is real: fewer experts, a smaller stock checkpoint. Stage 2
zeros are stored dense: no runtime serves sparse MoE experts. vLLM ran 2:4 sparsity (compressed-
tensors ``sparse-24-bitmask``, CUTLASS kernels) only for dense ``Linear`` layers, never for its
fused-MoE layers, and removed the Sparse24 integration and kernels in 2026 (vllm-project/vllm
#36799, "Sparse24 models are no longer supported by vLLM"); compressed-tensors after 0.14 no longer
loads the format either. So the 2:4 pattern saves neither memory nor time in vLLM, SGLang or
transformers today; it keeps the weights ready for 2:4 sparse tensor cores (torch's
semi-structured sparsity on Ampere and later) in a runtime that wires them to experts.
Legend: E experts before, K kept, H hidden size, I expert FFN size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_weights, write_expert
from .seed_stats import SeedStats
from .select import PrunePlan
from .structural import keep_layer_experts, set_expert_count
from .stun_math import behaviour_distance, closest_to_centroid, greedy_clusters, wanda_mask

WANDA_STATS = ("wanda",)
SERVER_NOTE = ("zeros stored dense: vLLM served 2:4 (compressed-tensors sparse-24-bitmask) only for dense Linear "
               "layers, never fused MoE experts, and removed it (vllm-project/vllm#36799); compressed-tensors > 0.14 "
               "no longer loads the format; no runtime saves memory or time on these zeros today")


def stats_for(similarity: str) -> tuple[str, ...]:
    """Stage 1's statistics: routing counts, and co-selection counts for ``similarity="coact"``."""
    return ("routing", "coact") if similarity == "coact" else ("routing",)


@dataclass(frozen=True)
class StunDecision:
    clusters: tuple[tuple[int, ...], ...]  # original ids, representative first

    @property
    def keep(self) -> list[int]:
        return sorted(c[0] for c in self.clusters)

    def to_json(self) -> list[list[int]]:
        return [list(c) for c in self.clusters]


@torch.no_grad()
def decide_stun(stats: SeedStats | None, experts: nn.Module, router_weight: torch.Tensor, plan: PrunePlan,
                protected=frozenset(), protect: bool = True, similarity: str = "router", mix: float = 0.0
                ) -> StunDecision:
    """STUN stage 1 for one layer: greedy clusters by behaviour distance; each cluster's representative
    is the member whose weights are closest to the cluster's mean."""
    prot = set(protected) if protect else set()
    dist = behaviour_distance(similarity, router_weight, stats.coact if stats is not None else None, mix)
    clusters = greedy_clusters(dist, plan.num_remove, plan.groups(), prot)
    out = []
    for c in clusters:
        if len(c) > 1:
            flat = torch.stack([torch.cat([t.detach().float().reshape(-1).cpu()
                                           for _, t in sorted(expert_weights(experts, e).items())]) for e in c])
            rep = c[closest_to_centroid(flat)]
            c = (rep, *[e for e in c if e != rep])
        out.append(tuple(c))
    return StunDecision(tuple(sorted(out, key=lambda c: c[0])))


def apply_stun(block: nn.Module, adapter: MoEAdapter, decision: StunDecision, path: str = "") -> list[int]:
    keep = decision.keep
    keep_layer_experts(block, adapter, keep, path)
    return keep


@torch.no_grad()
def apply_wanda(block: nn.Module, adapter: MoEAdapter, stats: SeedStats, skip=frozenset(), sparsity: float = 0.5,
                pattern: str = "2:4") -> dict:
    """STUN stage 2 on one layer: Wanda masks inside every routed expert but ``skip`` (current ids),
    from ``stats`` of the changed layer ("wanda"). Returns {expert: share of its weights zeroed}."""
    experts = adapter.experts_of(block)
    E = int(adapter.router_of(block).weight.shape[0])
    out = {}
    for e in range(E):
        if e in skip:
            continue
        w = {k: v.clone() for k, v in expert_weights(experts, e).items()}
        routed = stats.in_sq is not None and float(stats.freq[e]) > 0
        x_sq = stats.in_sq[e] if routed else torch.ones(w["gate_proj"].shape[1], dtype=torch.float64)  # [H]
        a_sq = stats.act_sq[e] if routed else torch.ones(w["down_proj"].shape[1], dtype=torch.float64)  # [I]
        zero, total = 0, 0
        for name, sq in (("gate_proj", x_sq), ("up_proj", x_sq), ("down_proj", a_sq)):
            m = wanda_mask(w[name], sq, sparsity, pattern).to(w[name].device)
            w[name] = w[name] * m
            zero, total = zero + int((~m).sum()), total + m.numel()
        write_expert(experts, e, w)
        out[e] = zero / total
    return out


def finish_stun(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> None:
    set_expert_count(model, adapter, plan.num_keep)
