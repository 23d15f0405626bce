"""Per-expert activation capture for fused (3D) and per-expert expert layouts.

transformers 5 runs all experts of a layer inside one module whose weights are 3D
tensors, so hooks on ``nn.Linear`` see nothing. :func:`instrument` swaps each
experts module's ``forward`` for one that computes the same result expert by
expert (using the module's own ``_apply_gate``, bias and transpose flags) and
hands each expert's down_proj input/output to a :class:`Recorder`. Leaving the
context restores every module.

Shape legend: T tokens (batch x sequence, flattened), K top-k, E experts,
H hidden size, I expert FFN size, S sequence length.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import MoEAdapter
from .errors import CalibrationError
from .experts import grouped_forward
from .layout import PerExpertExperts



MEDIAN_SAMPLE = 1 << 16  # values sampled per batch for the median |hidden|


@dataclass
class ExpertStats:
    """Running statistics of one MoE layer's experts (E routed + 1 shared slot at index E)."""

    n: int  # E + 1
    out_max: torch.Tensor = None  # [n] max |down_proj output|
    out_channel: torch.Tensor = None  # [n] hidden channel of that max
    out_pos: torch.Tensor = None  # [n] sequence position of that max
    in_max: torch.Tensor = None  # [n] max |down_proj input|
    tokens: torch.Tensor = None  # [n] tokens routed (shared: all tokens)
    gate_sum: torch.Tensor = None  # [n] sum of routing weights
    norm_sum: torch.Tensor = None  # [n] sum of ||expert output||_2
    gated_norm_sum: torch.Tensor = None  # [n] sum of routing weight * ||expert output||_2

    def __post_init__(self):
        for name in ("out_max", "in_max", "gate_sum", "norm_sum", "gated_norm_sum"):
            setattr(self, name, torch.zeros(self.n, dtype=torch.float64, device="cpu"))  # host statistics
        for name in ("out_channel", "out_pos", "tokens"):
            setattr(self, name, torch.zeros(self.n, dtype=torch.long, device="cpu"))


@dataclass
class Recorder:
    """Collects expert, hidden-state and attention statistics during forward passes."""

    seq_len: int = 0  # set by the driver before each batch
    experts: dict[int, ExpertStats] = field(default_factory=dict)
    hidden_max: dict[int, float] = field(default_factory=dict)  # layer -> max |h| (any token)
    hidden_first_max: dict[int, float] = field(default_factory=dict)  # layer -> max |h| at position 0
    hidden_median: dict[int, list[float]] = field(default_factory=dict)  # layer -> per-batch median |h|
    sink_mass: dict[int, list[float]] = field(default_factory=dict)  # layer -> per-batch attention to pos 0

    def stats(self, layer: int, num_experts: int) -> ExpertStats:
        if layer not in self.experts:
            self.experts[layer] = ExpertStats(num_experts + 1)
        return self.experts[layer]

    @torch.no_grad()
    def observe_experts(self, layer: int, num_experts: int, col: torch.Tensor, token_idx: torch.Tensor,
                        act: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None) -> None:
        """col [S] expert column of each row (``num_experts`` for a shared expert), token_idx [S]
        flat token index, act [S, I] down_proj input, out [S, H] down_proj output, weights [S]."""
        self.observe_rows(layer, num_experts, col, token_idx, *row_stats(act, out), weights)

    @torch.no_grad()
    def observe_rows(self, layer: int, num_experts: int, col: torch.Tensor, token_idx: torch.Tensor,
                     row_max: torch.Tensor, row_ch: torch.Tensor, row_in: torch.Tensor, row_norm: torch.Tensor,
                     weights: torch.Tensor | None) -> None:
        """Vectorised update from per-row reductions ([S] each, see :func:`row_stats`)."""
        if col.numel() == 0:
            return
        col, token_idx, row_max, row_ch, row_in, row_norm = (  # per-row reductions: small, to the host
            t.detach().cpu() for t in (col, token_idx, row_max, row_ch, row_in, row_norm))
        weights = None if weights is None else weights.detach().cpu()
        st = self.stats(layer, num_experts)
        n = st.n
        row_max = row_max.double()
        seg_max = torch.zeros(n, dtype=torch.float64, device="cpu").scatter_reduce(0, col, row_max, "amax")  # [n]
        in_max = torch.zeros(n, dtype=torch.float64, device="cpu").scatter_reduce(0, col, row_in.double(), "amax")
        if not (torch.isfinite(seg_max).all() and torch.isfinite(in_max).all()):
            bad = sorted(set(col[~torch.isfinite(row_max)].tolist()) or {-1})
            raise CalibrationError(f"non-finite expert activation in layer {layer} (expert column {bad}): "
                                   "check the model's weights and dtype and the calibration data")
        # the first row reaching each column's max gives its channel and position
        rows = torch.arange(len(col), device="cpu")
        hit = row_max == seg_max[col]
        first = torch.full((n,), len(col), dtype=torch.long, device="cpu").scatter_reduce(0, col[hit], rows[hit], "amin")
        improved = (seg_max > st.out_max) & (first < len(col))
        idx = first[improved]
        st.out_max[improved] = seg_max[improved]
        st.out_channel[improved] = row_ch[idx]
        st.out_pos[improved] = token_idx[idx] % max(1, self.seq_len)
        st.in_max = torch.maximum(st.in_max, in_max)
        norms = row_norm.double()
        w = weights.detach().double() if weights is not None else torch.ones_like(norms)
        st.tokens += torch.bincount(col, minlength=n)
        st.norm_sum.index_add_(0, col, norms)
        st.gate_sum.index_add_(0, col, w)
        st.gated_norm_sum.index_add_(0, col, w * norms)

    @torch.no_grad()
    def observe_hidden(self, layer: int, h: torch.Tensor) -> None:
        """h [B, S, H]: the residual stream after a decoder layer."""
        a = h.detach().abs()  # [B, S, H]
        top = float(a.amax())  # NaN propagates through amax
        if not math.isfinite(top):
            raise CalibrationError(f"non-finite hidden state after layer {layer}")
        self.hidden_max[layer] = max(self.hidden_max.get(layer, 0.0), top)
        self.hidden_first_max[layer] = max(self.hidden_first_max.get(layer, 0.0), float(a[:, 0].amax()))
        flat = a.reshape(-1)
        step = max(1, flat.numel() // MEDIAN_SAMPLE)  # a strided sample: exact median costs a full sort
        self.hidden_median.setdefault(layer, []).append(float(flat[::step].float().median()))

    @torch.no_grad()
    def observe_attention(self, layer: int, probs: torch.Tensor) -> None:
        """probs [B, heads, S, S]: mean attention that queries 1.. put on key 0."""
        if probs is None or probs.shape[-2] < 2:
            return
        self.observe_sink_edge(layer, sink_edge(probs))

    @torch.no_grad()
    def observe_sink_edge(self, layer: int, edge: torch.Tensor) -> None:
        """edge [B, heads, S-1]: the attention queries 1.. put on key 0 (:func:`sink_edge`)."""
        self.sink_mass.setdefault(layer, []).append(edge_mass(edge))


def sink_edge(probs: torch.Tensor) -> torch.Tensor:
    """probs [B, heads, S, S] -> [B, heads, S-1]: the attention queries 1.. put on key 0 (a view)."""
    return probs[:, :, 1:, 0]


def edge_mass(edge: torch.Tensor) -> float:
    """Mean of ``edge`` [B, heads, S-1], summed in a contiguous float32 copy so that the result does
    not depend on where the rows came from (a view of the probabilities or a concatenation)."""
    return float(edge.float().contiguous().mean())


@torch.no_grad()
def row_stats(act: torch.Tensor, out: torch.Tensor):
    """Per-row reductions of one expert's down_proj: act [c, I], out [c, H] ->
    max |out| [c], its channel [c], max |act| [c], ||out||_2 [c]. Maxima are exact in any dtype; the
    norm sums squares in float32 (a bfloat16 sum of H squares loses digits), one expert's rows at a time."""
    row_max, row_ch = out.detach().abs().max(dim=-1)
    norm = torch.linalg.vector_norm(out.detach(), dim=-1, dtype=torch.float32)
    return row_max, row_ch, act.detach().abs().amax(dim=-1), norm


def _fused_forward(rec: Recorder, layer: int):
    """A forward for a fused experts module that records each expert's down_proj in/out.

    All experts run in one pass over the routed rows sorted by expert
    (:func:`~secompress.experts.grouped_forward`), the per-row reductions run once over all rows,
    and each token's output sums its experts' weighted outputs in ascending expert order in the
    output dtype, as one ``index_add_`` per expert does (the same additions, batched over tokens).
    """

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        E, K = self.num_experts, top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # [T*K] rows sorted by expert
        per_expert = torch.bincount(flat, minlength=E + 1)[:E]  # [E] ids >= E are EP sentinels, sorted last
        counts = per_expert.tolist()
        order = order[: sum(counts)]  # [R] routed rows
        tok, slot = order // K, order % K  # [R]
        act, y = grouped_forward(self, hidden_states[tok], counts)  # [R, I], [R, H]
        weight = top_k_weights[tok, slot]  # [R]
        col = torch.repeat_interleave(torch.arange(E, device=tok.device), per_expert)  # [R] expert of each row
        rec.observe_rows(layer, E, col, tok, *row_stats(act, y), weight)
        del act
        contrib = (y * weight[:, None]).to(hidden_states.dtype)  # [R, H] weighted outputs
        del y
        return _sum_in_expert_order(contrib, top_k_index, order)

    return forward


def _sum_in_expert_order(contrib: torch.Tensor, top_k_index: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """contrib [R, H] (row r belongs to token ``order[r] // K``) -> [T, H]: per token, its rows added
    to zeros one at a time in ascending expert order (ties: ascending slot), rounding to the output
    dtype after each addition. Rows of EP sentinels (ids >= E) are absent and add nothing."""
    T, K = top_k_index.shape
    rank = torch.empty_like(top_k_index)  # [T, K] position of each slot in its token's expert order
    rank.scatter_(1, torch.argsort(top_k_index, dim=-1, stable=True),
                  torch.arange(K, device=top_k_index.device).expand(T, K))
    grid = contrib.new_zeros(T * K, contrib.shape[-1])  # [T*K, H] token-major, expert order within token
    grid[(order // K) * K + rank.reshape(-1)[order]] = contrib
    grid = grid.view(T, K, -1)
    out = contrib.new_zeros(T, contrib.shape[-1])  # [T, H]
    for j in range(K):
        out += grid[:, j]
    return out


def _per_expert_hooks(rec: Recorder, layer: int, experts: nn.Module, E: int):
    """Forward hooks on each ``per_expert[e].down_proj`` (an ``nn.Linear``) of a defused layer."""
    def make(e):
        def hook(mod, inp, out):
            tok = experts.current_tokens
            rec.observe_experts(layer, E, torch.full_like(tok, e), tok, inp[0], out, experts.current_weights)
        return hook
    return [experts.per_expert[e].down_proj.register_forward_hook(make(e)) for e in range(E)]


def _shared_hook(rec: Recorder, layer: int, E: int):
    def hook(mod, inp, out):
        y = out.reshape(-1, out.shape[-1])  # [T, H]
        tok = torch.arange(y.shape[0], device=y.device)
        rec.observe_experts(layer, E, torch.full_like(tok, E), tok, inp[0].reshape(-1, inp[0].shape[-1]), y, None)
    return hook


def layer_output_hooks(layer: nn.Module, on_hidden, on_attention=None) -> list:
    """Forward hooks handing ``on_hidden`` the hidden states [B, S, H] a decoder layer outputs and
    ``on_attention`` the probabilities [B, heads, S, S] its ``self_attn`` returns (None where the
    attention implementation returns none: eager does); returns the handles to remove."""
    handles = [layer.register_forward_hook(lambda m, a, o: on_hidden(o[0] if isinstance(o, tuple) else o))]
    if on_attention is not None and hasattr(layer, "self_attn"):
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, o: on_attention(o[1] if isinstance(o, tuple) else None)))
    return handles


@contextmanager
def instrument(model: nn.Module, adapter: MoEAdapter, rec: Recorder, attention: bool = True, experts: bool = True):
    """Record expert (unless ``experts=False``), hidden-state and attention statistics; restore the
    model on exit."""
    handles, swapped, record_experts = [], [], experts
    try:
        for i, layer in enumerate(adapter.layers(model)):
            handles += layer_output_hooks(layer, lambda h, i=i: rec.observe_hidden(i, h),
                                          (lambda p, i=i: rec.observe_attention(i, p)) if attention else None)
            block = adapter.block_of(layer)
            if block is None or not record_experts:
                continue
            experts = adapter.experts_of(block)
            E = adapter.num_experts(model.config)
            if isinstance(experts, PerExpertExperts):
                handles += _per_expert_hooks(rec, i, experts, E)
            else:
                experts.forward = types.MethodType(_fused_forward(rec, i), experts)
                swapped.append(experts)
            shared = adapter.shared_of(block)
            if shared is not None:
                handles.append(shared.down_proj.register_forward_hook(_shared_hook(rec, i, E)))
        yield rec
    finally:
        for h in handles:
            h.remove()
        for m in swapped:
            del m.forward  # falls back to the class's forward
