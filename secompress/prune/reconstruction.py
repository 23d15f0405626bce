"""NAEE: layer-wise expert pruning by reconstruction loss.

Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping
for Mixture-of-Experts Large Language Models" (ACL 2024): for each MoE layer,
choose the experts to keep so that the layer's output on calibration inputs changes
least, ``min_S || block(x) - block_S(x) ||^2``, where ``block_S`` routes only among
the kept set S. The paper enumerates the subsets; here they are enumerated when the
number of allowed removal sets is at most ``limit``, else experts are removed
greedily one at a time (each step removes the expert whose removal adds the least
loss).

Three parts: :func:`capture_block_inputs` (a forward pre-hook on each MoE block,
as a context manager), :func:`block_loss` (the loss of one removal set, routing
masked with :func:`secompress.ablate.mask_experts`, which renormalises the routing
exactly as the structurally pruned router will), and :func:`search` (pure: subsets
and greedy over any loss function).
Legend: N windows, S sequence length, T = N x S tokens, H hidden size, E experts.
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..ablate import mask_experts
from ..adapters import MoEAdapter
from .select import PrunePlan, num_subsets

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 5000


@contextmanager
def capture_block_inputs(model: nn.Module, adapter: MoEAdapter, layers: Iterable[int]):
    """Yield {layer: [x [N_b, S, H] per forward]}: the hidden states entering each MoE block."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []

    def make(layer: int):
        def hook(module, args):
            captured[layer].append(args[0].detach().clone())
        return hook

    try:
        for layer in layers:
            block = adapter.block_of(adapter.layers(model)[layer])
            if block is None:
                raise ValueError(f"layer {layer} has no MoE block")
            captured[layer] = []
            handles.append(block.register_forward_pre_hook(make(layer)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def _out(y):
    return y[0] if isinstance(y, tuple) else y  # GPT-OSS blocks return (hidden, router_scores)


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [_out(block(x)) for x in inputs]


@torch.no_grad()
def block_loss(model: nn.Module, adapter: MoEAdapter, layer: int, inputs: Sequence[torch.Tensor],
               reference: Sequence[torch.Tensor], removed: Iterable[int]) -> float:
    """Mean over tokens of ||block(x) - block_without(removed)(x)||^2 (float64 accumulation)."""
    block = adapter.block_of(adapter.layers(model)[layer])
    total, count = 0.0, 0
    with mask_experts(model, [(layer, int(e)) for e in removed]):
        for x, ref in zip(inputs, reference):
            y = _out(block(x))
            total += float((y.double() - ref.double()).pow(2).sum())
            count += x.shape[:-1].numel()
    return total / max(1, count)


@dataclass(frozen=True)
class LayerChoice:
    removed: tuple[int, ...]
    loss: float
    exhaustive: bool
    unprotected: tuple[int, ...]  # the best choice had SEs not been protected
    unprotected_loss: float


def _group_sets(plan: PrunePlan) -> Iterable[tuple[int, ...]]:
    per_group = [itertools.combinations(m, plan.remove_per_group) for m in plan.groups()]
    for parts in itertools.product(*per_group):
        yield tuple(e for p in parts for e in p)


def _greedy(loss: Callable[[tuple[int, ...]], float], plan: PrunePlan, banned: set[int]) -> tuple[tuple, float]:
    group_of = {e: g for g, m in enumerate(plan.groups()) for e in m}
    removed: list[int] = []
    best = 0.0
    for _ in range(plan.num_remove):
        used = [sum(group_of[r] == g for r in removed) for g in range(plan.n_group)]
        cands = [e for e in range(plan.num_experts) if e not in removed and e not in banned
                 and used[group_of[e]] < plan.remove_per_group]
        best, pick = min((loss(tuple(sorted(removed + [e]))), e) for e in cands)
        removed.append(pick)
    return tuple(sorted(removed)), best


def search(loss: Callable[[tuple[int, ...]], float], plan: PrunePlan, protected: Iterable[int] = (),
           limit: int = DEFAULT_LIMIT) -> LayerChoice:
    """The removal set (of ``plan.num_remove`` experts, per-group quotas respected) with the
    least ``loss`` that removes no protected expert: all sets when at most ``limit``, else greedy."""
    prot = set(protected)
    if num_subsets(plan) <= limit:
        losses = {s: loss(s) for s in _group_sets(plan)}
        unp = min(losses, key=lambda s: (losses[s], s))
        feasible = [s for s in losses if not prot & set(s)]
        if not feasible:
            raise ValueError(f"no removal set of {plan.num_remove} experts avoids the protected {sorted(prot)}")
        got = min(feasible, key=lambda s: (losses[s], s))
        return LayerChoice(got, losses[got], True, unp, losses[unp])
    got, got_loss = _greedy(loss, plan, prot)
    unp, unp_loss = _greedy(loss, plan, set()) if prot else (got, got_loss)
    return LayerChoice(got, got_loss, False, unp, unp_loss)


@torch.no_grad()
def naee_layer(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan, layer: int, xs: list[torch.Tensor],
               protected: set[int], limit: int = DEFAULT_LIMIT) -> LayerChoice:
    """NAEE for one MoE layer: ``xs`` the inputs of its block ([B, S, H] per chunk, captured with
    :func:`capture_block_inputs`), ``protected`` the routed experts it must keep (its SEs, or none)."""
    if not xs:
        raise ValueError(f"no input was captured for the MoE block of layer {layer}")
    plan.check_protection(layer, protected)
    block = adapter.block_of(adapter.layers(model)[layer])
    ref = block_outputs(block, xs)
    choice = search(lambda s: block_loss(model, adapter, layer, xs, ref, s), plan, protected, limit)
    log.info("NAEE layer %d: remove %s (loss %.4g, %s)", layer, list(choice.removed), choice.loss,
             "exhaustive" if choice.exhaustive else "greedy")
    return choice


__all__ = ["DEFAULT_LIMIT", "LayerChoice", "block_loss", "block_outputs", "capture_block_inputs", "naee_layer",
           "search"]
