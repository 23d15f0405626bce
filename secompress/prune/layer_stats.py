"""Per-MoE-layer calibration statistics for merging and neuron pruning (hooks; no decisions).

:class:`LayerStats` accumulates, for one MoE layer, from what its experts module receives
(``x [T, H]``, top-k ids and weights) and optionally the router logits and the gradient of
the loss with respect to the experts' output:
  freq      [E]     routed-token counts                            (M-SMoE, HC-SMoE weights)
  logits    [T, E]  router logits                                  (M-SMoE similarity)
  out_sum   [E, H]  each expert's output summed over ALL tokens    (HC-SMoE features)
  heapr     [E, I]  HEAPr atomic-expert scores                     (:mod:`.heapr`)
  massive   {e: (|y_c|, act [I])} for tracked (expert, channel)s: the down_proj input on the
            token where the expert writes its largest |output| on that channel (SE neurons)
The methods' per-layer steps (:mod:`secompress.prune.methods`) use :func:`capture` (hooks on a MoE
layer's experts and router, removed on exit) and :meth:`LayerStats.observe_captured`, through
:func:`observe_entered` on the hidden states entering the layer (any layer source).
Legend: T tokens, K top-k, E experts, H hidden size, I expert FFN size.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import MoEAdapter
from ..experts import expert_forward, expert_weights
from .heapr import atomic_scores

WANTS = ("logits", "outputs", "heapr")


@dataclass
class LayerStats:
    num_experts: int
    want: frozenset = frozenset()  # of WANTS
    track: dict = field(default_factory=dict)  # expert -> hidden channel whose writer neurons to find
    freq: torch.Tensor = None  # [E]
    logits: list = field(default_factory=list)  # [T, E] chunks
    out_sum: torch.Tensor | None = None  # [E, H]
    tokens: int = 0
    heapr: torch.Tensor | None = None  # [E, I]
    massive: dict = field(default_factory=dict)  # expert -> (value, act [I])

    def __post_init__(self):
        bad = set(self.want) - set(WANTS)
        if bad:
            raise ValueError(f"unknown statistics {sorted(bad)}; known: {WANTS}")
        self.freq = torch.zeros(self.num_experts, dtype=torch.float64, device="cpu")  # host statistics

    @torch.no_grad()
    def observe(self, experts: nn.Module, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor,
                logits: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> None:
        """One batch of a layer: x [T, H] experts' input, top_idx / top_w [T, K], logits [T, E],
        grad [T, H] dL/d(routed experts' output) (None: identity Hessian for HEAPr)."""
        E = self.num_experts
        x = x.reshape(-1, x.shape[-1])
        top_idx, top_w = top_idx.reshape(x.shape[0], -1), top_w.reshape(x.shape[0], -1)
        self.tokens += x.shape[0]
        self.freq += torch.bincount(top_idx.reshape(-1).cpu(), minlength=E + 1)[:E].double()  # ids >= E: EP sentinels
        if "logits" in self.want and logits is not None:
            self.logits.append(logits.detach().reshape(x.shape[0], -1).float().cpu())
        if "outputs" in self.want:
            outs = torch.stack([expert_forward(experts, e, x)[1].double().sum(0) for e in range(E)])  # [E, H]
            self.out_sum = outs if self.out_sum is None else self.out_sum + outs
        if "heapr" in self.want or self.track:
            for e in range(E):
                tok, slot = torch.where(top_idx == e)  # [c]
                if tok.numel() == 0:
                    continue
                act, y = expert_forward(experts, e, x[tok])  # [c, I], [c, H]
                if "heapr" in self.want:
                    down = expert_weights(experts, e)["down_proj"]  # [H, I]
                    s = atomic_scores(act, top_w[tok, slot], down, None if grad is None else grad[tok]).cpu()
                    if self.heapr is None:
                        self.heapr = torch.zeros(E, act.shape[1], dtype=torch.float64, device="cpu")
                    self.heapr[e] += s
                if e in self.track:
                    col = y[:, self.track[e]].abs()  # [c]
                    r = int(col.argmax())
                    if e not in self.massive or float(col[r]) > self.massive[e][0]:
                        self.massive[e] = (float(col[r]), act[r].detach().double().cpu())

    def observe_captured(self, experts: nn.Module, s: dict) -> None:
        """:meth:`observe` on what :func:`capture` stored for this layer (and ``s["grad"]`` if set)."""
        self.observe(experts, s["x"], s["idx"], s["w"], s.get("logits"), s.get("grad"))

    def router_logits(self) -> torch.Tensor:
        return torch.cat(self.logits)  # [T, E]

    def mean_outputs(self) -> torch.Tensor:
        return self.out_sum / max(1, self.tokens)  # [E, H]


@contextmanager
def capture(model: nn.Module, adapter: MoEAdapter, layers: list[int], store: dict, grads: bool):
    """Hooks that put each MoE layer's (x, top_idx, top_w, logits, output) of the last forward into
    ``store[layer]``; with ``grads`` the outputs ``y`` stay in the graph for autograd. ``model``
    only has to hold ``layers`` (materialised) under ``adapter.layers_path``."""
    handles = []
    try:
        for l in layers:
            block = adapter.block_of(adapter.layers(model)[l])

            def pre(mod, args, l=l):  # every MoE block calls experts(hidden [T, H], top_k_index, top_k_weights)
                x, idx, w = args[:3]
                store.setdefault(l, {}).update(x=x.detach(), idx=idx.detach(), w=w.detach())

            def post(mod, args, out, l=l):
                store.setdefault(l, {})["y"] = out

            def router(mod, args, out, l=l):
                store.setdefault(l, {})["logits"] = (out[0] if isinstance(out, tuple) else out).detach()

            handles.append(adapter.experts_of(block).register_forward_pre_hook(pre))
            handles.append(adapter.router_of(block).register_forward_hook(router))
            if grads:
                handles.append(adapter.experts_of(block).register_forward_hook(post))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(model: nn.Module):
    """No parameter needs a gradient inside (activation gradients only); restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@torch.no_grad()
def observe_entered(model: nn.Module, adapter: MoEAdapter, index: int, layer: nn.Module, hidden, args,
                    stats: LayerStats) -> LayerStats:
    """Statistics of decoder layer ``index`` (as it is now: call it before changing the layer) on the
    hidden states entering it (``hidden`` [B, S, H] per chunk, ``args`` the layer's other arguments per
    chunk), chunk by chunk in the calibration batches' order."""
    from ..streaming import run_layer

    experts = adapter.experts_of(adapter.block_of(layer))
    for h, (a, kw) in zip(hidden, args):
        store: dict = {}
        with capture(model, adapter, [index], store, grads=False):
            run_layer(layer, h, a, kw)
        stats.observe_captured(experts, store[index])
    return stats
