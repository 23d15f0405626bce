"""Expert merging (M-SMoE, HC-SMoE) per MoE layer: statistics -> decision -> applied to the layer.

    decision = decide_merge(msmoe_groups, stats.router_logits(), stats.freq, plan, {3})   # one layer
    apply_merge(block, adapter, decision, stats.freq, align=True)   # that layer's modules, in place

The method's per-layer step (:mod:`secompress.prune.methods.merge`) runs both per layer (statistics
from :class:`~secompress.prune.layer_stats.LayerStats`) and calls :func:`finish_merge` once.
After :func:`apply_merge` the layer holds K experts, the representatives of the groups in
their original order; each holds its group's frequency-weighted average (a group of one is
left untouched, bit for bit), and the router keeps the representatives' rows
(see :mod:`secompress.prune.merge` for why). Shared experts are never touched.
Legend: E experts before, K after.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_weights, write_expert
from .merge import MergeDecision, merge_weights
from .select import PrunePlan, protected_by_layer
from .structural import keep_layer_experts, set_expert_count

def merge_targets(plan: PrunePlan) -> list[int]:
    """Experts each routing group keeps (merging stays inside a group, so groups stay equal)."""
    return [plan.num_keep // plan.n_group] * plan.n_group


def decide_merge(groups_fn, features: torch.Tensor, freq: torch.Tensor, plan: PrunePlan,
                 protected=frozenset()) -> MergeDecision:
    """Which experts of one layer merge: ``groups_fn`` (:func:`~.merge.msmoe_groups` with the router
    logits [T, E], or :func:`~.merge.hcsmoe_groups` with the mean outputs [E, H] as ``features``),
    ``freq`` [E] routed-token counts; each routing group keeps its share."""
    return groups_fn(freq, features, merge_targets(plan), plan.groups(), set(protected))


@torch.no_grad()
def apply_merge(block: nn.Module, adapter: MoEAdapter, decision: MergeDecision, freq: torch.Tensor,
                align: bool, path: str = "") -> list[int]:
    """Write each group's merged weights into its representative, then keep only the
    representatives. Returns the kept original ids (new id = position)."""
    experts = adapter.experts_of(block)
    for g in decision.groups:
        if len(g) > 1:
            members = [{k: v.clone() for k, v in expert_weights(experts, e).items()} for e in g]
            write_expert(experts, g[0], merge_weights(members, [float(freq[e]) for e in g], align))
    keep = decision.representatives
    keep_layer_experts(block, adapter, keep, path)
    return keep


def finish_merge(model: nn.Module, adapter: MoEAdapter, num_keep: int) -> None:
    """After every MoE layer was merged: the model's and the config's expert count."""
    set_expert_count(model, adapter, num_keep)


def merged_super_experts(decisions: dict[int, MergeDecision], ses) -> list[tuple[int, int]]:
    """(layer, expert) of the routed Super Experts that share a group with another expert."""
    prot = protected_by_layer(ses)
    return sorted((l, e) for l, d in decisions.items() for g in d.groups if len(g) > 1
                  for e in g if e in prot.get(l, ()))
