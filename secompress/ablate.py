"""Disable named experts without changing the architecture (for ablations).

Two variants, both context managers that restore the model on exit:

- ``zero_experts``: the expert's down_proj (and bias) is zeroed, so its output is zero
  while the router still sends tokens to it and still gives it routing weight. This is
  the experiment of Su et al. 2025 (arXiv 2507.23279, Sec. 4): "pruning" an SE there
  means its output is removed.
- ``mask_experts``: the router logits of the experts are set to -inf, so tokens are
  routed to the remaining experts instead (top-k re-picks among the others).

Experts are named ``(layer, expert)`` with ``expert`` an int or ``"shared"``.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .adapters import MoEAdapter, get_adapter

ExpertId = tuple[int, "int | str"]


def _block(model, adapter: MoEAdapter, layer: int) -> nn.Module:
    block = adapter.block_of(adapter.layers(model)[layer])
    if block is None:
        raise ValueError(f"layer {layer} has no MoE block")
    return block


@contextmanager
@torch.no_grad()
def zero_experts(model, experts: Iterable[ExpertId]):
    """Zero the outputs of ``experts`` (routing unchanged); weights restored on exit."""
    adapter = get_adapter(model.config)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (view into the parameter, its original values)
    try:
        for layer, e in experts:
            block = _block(model, adapter, layer)
            if e == "shared":
                shared = adapter.shared_of(block)
                if shared is None:
                    raise ValueError(f"layer {layer} has no shared expert")
                views = [p for p in shared.down_proj.parameters()]
            else:
                ex = adapter.experts_of(block)
                if not 0 <= int(e) < ex.num_experts:
                    raise ValueError(f"expert {e} out of range in layer {layer} ({ex.num_experts} experts)")
                views = [ex.down_proj[int(e)]]
                if getattr(ex, "has_bias", False):
                    views.append(ex.down_proj_bias[int(e)])
            for v in views:
                saved.append((v, v.detach().clone()))
                v.zero_()
        yield model
    finally:
        with torch.no_grad():
            for v, orig in saved:
                v.copy_(orig)


class _MaskRouterLogits(TorchFunctionMode):
    """Inside a router's forward: add -inf to the masked columns of its [T, E] linear output."""

    def __init__(self, num_experts: int, masked: list[int]):
        super().__init__()
        self.E, self.masked = num_experts, masked

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and isinstance(out, torch.Tensor) and out.shape[-1] == self.E:
            out = out.clone()
            out[..., self.masked] = float("-inf")
        return out


def _enter(mode):
    def hook(module, args):
        mode.__enter__()  # a pre-hook must return None, or it replaces the arguments
    return hook


def _exit(mode):
    def hook(module, args, out):
        mode.__exit__(None, None, None)
    return hook


@contextmanager
@torch.no_grad()
def mask_experts(model, experts: Iterable[ExpertId]):
    """Route no token to ``experts``: their router logits (and per-expert router biases) are -inf."""
    adapter = get_adapter(model.config)
    per_layer: dict[int, list[int]] = defaultdict(list)
    for layer, e in experts:
        if e == "shared":
            raise ValueError("a shared expert has no router logit: use zero_experts for it")
        per_layer[layer].append(int(e))
    handles, saved = [], []
    try:
        for layer, masked in per_layer.items():
            block = _block(model, adapter, layer)
            router = adapter.router_of(block)
            E = adapter.num_experts(model.config)
            if len(masked) > E - adapter.top_k(model.config):
                raise ValueError(f"layer {layer}: masking {len(masked)} of {E} experts leaves fewer than top-k")
            for name in adapter.router_per_expert:
                t = getattr(router, name)
                saved.append((t, t.detach().clone()))
                t[masked] = float("-inf")
            mode = _MaskRouterLogits(E, masked)
            handles.append(router.register_forward_pre_hook(_enter(mode)))
            handles.append(router.register_forward_hook(_exit(mode)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for t, orig in saved:
            t.copy_(orig)
