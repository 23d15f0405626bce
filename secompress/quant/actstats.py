"""Calibration statistics of one decoder layer's quantized inputs, and the rules that turn them into scales.

    with collect_layer(layer, adapter) as stats:       # hooks + an experts forward that records per expert
        for h, kw in calibration_inputs:                # the driver's stream through this layer
            layer(h, **kw)
    scales = static_input_scales(stats, scheme, rule="max")   # what llm-compressor's static min-max writes

Per input of every ``nn.Linear`` of the layer (attention, dense / shared MLP) and, per routed expert,
of its gate/up projections (``w13``, the tokens routed to it; all tokens with ``all_experts=True``, as
llm-compressor calibrates by default) and of its down projection (``w2``): the absmax over the
calibration tokens, the absmax per input channel (SmoothQuant statistics) and both again over the
tokens that are not *massive*. A massive token is one whose largest |hidden| entering the layer is at
least ``massive_threshold`` x the median token's (the first / <bos> token that a Super Expert turns
into the attention sink; on the reference model 13-28x in layers 1-5, the next token below 7.5x).

Rules (:func:`static_input_scales`): ``max`` (SE-unaware: every token sets the scale, llm-compressor's
``static_minmax``) and ``clip-massive`` (massive tokens excluded: they saturate at the clip value
instead of coarsening every other token's grid). Which one helps is measured in
``evals/bench_actquant.py``, not assumed. Linear layers that read the same tensor (q/k/v, gate/up) are
reported as :attr:`LayerStats.shared`, the groups a server fuses into one GEMM.
Legend: B windows, S sequence length, T tokens, H hidden size, In in features, E routed experts.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..experts import expert_forward
from .floatq import global_scale, scale_from_minmax
from .schemes import Scheme

MASSIVE_THRESHOLD = 10.0
RULES = ("max", "clip-massive")


@dataclass
class InputStats:
    """Statistics of one operand's input rows ``[N, In]`` over the calibration tokens."""

    amax: torch.Tensor | None = None  # [] over every token
    amax_clean: torch.Tensor | None = None  # [] over non-massive tokens
    channel_amax: torch.Tensor | None = None  # [In]
    channel_amax_clean: torch.Tensor | None = None  # [In]
    tokens: int = 0
    massive_tokens: int = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, massive: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()  # [N, In]
        if x.shape[0] == 0:
            return
        ch = x.amax(0)
        clean = x if massive is None else x[~massive]
        ch_clean = clean.amax(0) if clean.shape[0] else torch.zeros_like(ch)
        for name, v in (("channel_amax", ch), ("channel_amax_clean", ch_clean)):
            old = getattr(self, name)
            setattr(self, name, v if old is None else torch.maximum(old, v))
        self.amax, self.amax_clean = self.channel_amax.max(), self.channel_amax_clean.max()
        self.tokens += x.shape[0]
        self.massive_tokens += 0 if massive is None else int(massive.sum())

    def value(self, rule: str) -> torch.Tensor | None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        return self.amax if rule == "max" or self.amax_clean is None else self.amax_clean


@dataclass
class LayerStats:
    linears: dict[str, InputStats] = field(default_factory=dict)  # module name inside the layer -> stats
    w13: list[InputStats] = field(default_factory=list)  # [E] experts' gate/up input
    w2: list[InputStats] = field(default_factory=list)  # [E] experts' down input
    routed: list[int] = field(default_factory=list)  # [E] calibration tokens routed to each expert
    shared: list[tuple[str, ...]] = field(default_factory=list)  # Linear names reading one tensor (fused by servers)
    massive_tokens: int = 0
    tokens: int = 0


def massive_tokens(h: torch.Tensor, threshold: float) -> torch.Tensor:
    """[T] bool: tokens of ``h [..., H]`` whose max |h| >= threshold x the median token's."""
    tm = h.detach().abs().reshape(-1, h.shape[-1]).amax(-1).float()  # [T]
    return tm >= threshold * tm.median()


def _stats_forward(stats: LayerStats, state: dict, all_experts: bool):
    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        out = torch.zeros_like(hidden_states)
        T = hidden_states.shape[0]
        mass = state.get("massive")
        mass = mass if mass is not None and mass.numel() == T else None
        for e in range(self.num_experts):
            routed = top_k_index == e  # [T, K]
            tok = torch.arange(T, device=hidden_states.device) if all_experts else routed.any(-1).nonzero()[:, 0]
            stats.routed[e] += int(routed.any(-1).sum())
            if tok.numel() == 0:
                continue
            x = hidden_states[tok]
            m = None if mass is None else mass[tok]
            stats.w13[e].update(x, m)
            act, y = expert_forward(self, e, x)
            stats.w2[e].update(act, m)
            keep, slot = torch.where(routed[tok])  # rows of tok that are routed, and their top-k slot
            if keep.numel():
                w = top_k_weights[tok[keep], slot][:, None]
                out[tok[keep]] += (y[keep] * w).to(out.dtype)  # a token meets an expert once
        return out
    return forward


@contextmanager
def collect_layer(layer: nn.Module, adapter, massive_threshold: float = MASSIVE_THRESHOLD, all_experts: bool = False):
    """Inside the block, forwards through ``layer`` record a :class:`LayerStats` (yielded); hooks and
    the experts' forward are undone on exit. Outputs are the layer's own (routed experts only)."""
    stats, state, handles = LayerStats(), {}, []
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    inside = {id(m) for m in experts.modules()} if experts is not None else set()
    ptrs: dict[str, int] = {}

    def on_layer(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        state["massive"] = massive_tokens(h, massive_threshold)
        stats.tokens += state["massive"].numel()
        stats.massive_tokens += int(state["massive"].sum())

    def on_linear(name):
        def hook(mod, args):
            x = args[0]
            ptrs[name] = (x.data_ptr(), x.numel(), x)  # kept alive until the layer's forward ends (address reuse)
            m = state.get("massive")
            rows = x.numel() // x.shape[-1]
            stats.linears.setdefault(name, InputStats()).update(x, m if m is not None and m.numel() == rows else None)
        return hook

    handles.append(layer.register_forward_pre_hook(on_layer, with_kwargs=True))
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in inside:
            handles.append(mod.register_forward_pre_hook(on_linear(name)))
    if experts is not None:
        E = experts.num_experts
        stats.w13, stats.w2, stats.routed = [InputStats() for _ in range(E)], [InputStats() for _ in range(E)], [0] * E
        experts.forward = types.MethodType(_stats_forward(stats, state, all_experts), experts)

    def group_shared(mod, args, out):  # after each forward: Linear names that read one tensor
        by: dict[tuple, list[str]] = {}
        for n, (ptr, numel, _) in ptrs.items():
            by.setdefault((ptr, numel), []).append(n)
        for names in by.values():
            if len(names) > 1 and tuple(sorted(names)) not in stats.shared:
                stats.shared.append(tuple(sorted(names)))
        ptrs.clear()

    handles.append(layer.register_forward_hook(group_shared))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        if experts is not None:
            del experts.forward


# ---- rules: statistics -> static scales ---------------------------------------------------------
def static_input_scales(stats: LayerStats, scheme: Scheme, rule: str = "max", dtype: torch.dtype = torch.float32
                        ) -> dict[str, torch.Tensor]:
    """Static input scales of a scheme with calibrated inputs, keyed ``<linear name>`` and
    ``experts.<e>.w13`` / ``experts.<e>.w2``: FP8 / INT8 per-tensor ``input_scale`` ([1], in ``dtype``,
    the activations' dtype) or NVFP4's ``input_global_scale`` ([1] float32, computed in ``dtype``). An
    expert no calibration token reached gets the largest scale of its layer's experts (what vLLM serves
    anyway: the max over experts)."""

    a = scheme.inputs
    if a is None or not a.static:
        return {}

    def one(amax: torch.Tensor) -> torch.Tensor:
        if a.has_global_scale:  # computed in the activations' dtype, as llm-compressor's observer does
            return global_scale(amax.to(dtype))
        amax = amax.to(dtype).reshape(1)
        return scale_from_minmax(-amax, amax, a)

    out = {n: one(s.value(rule)) for n, s in stats.linears.items() if s.amax is not None}
    for kind in ("w13", "w2"):
        per = getattr(stats, kind)
        seen = [s.value(rule) for s in per if s.amax is not None]
        if not seen:
            continue
        top = torch.stack(seen).max()
        for e, s in enumerate(per):
            out[f"experts.{e}.{kind}"] = one(s.value(rule) if s.amax is not None else top)
    return out
