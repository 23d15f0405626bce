"""One expert's computation, for fused (transformers 5) and per-expert experts modules.

transformers 5 declares the storage of a fused experts module with the flags set by
``use_experts_implementation``: ``is_transposed`` (weights stored [E, H, 2I] / [E, I, H]),
``has_bias`` (``gate_up_proj_bias`` / ``down_proj_bias``), ``is_concatenated`` (gate rows
then up rows, or interleaved g0, u0, g1, u1, ...), ``has_gate`` and ``has_post_expert_norm``.
:func:`layout_of` reads them once; :func:`expert_forward` computes one expert exactly as the
module does (its own ``_apply_gate`` does the activation, clamping and de-interleaving);
:func:`split_gate_up` / :func:`join_gate_up` are the one place the gate/up interleave rule lives.
Everything that runs or reads experts one at a time (profiling hooks, all-expert
calibration, the per-expert layout) goes through these functions.
Legend: c rows (tokens routed to the expert), E experts, H hidden size, I expert FFN size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ExpertLayout:
    transposed: bool = False
    has_bias: bool = False
    concatenated: bool = True


def layout_of(experts: nn.Module) -> ExpertLayout:
    """The storage flags of an experts module (fused or per-expert)."""
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedModelError(f"{type(experts).__name__}: experts without a gate projection or with a "
                                    "post-expert norm are not supported")
    return ExpertLayout(bool(getattr(experts, "is_transposed", False)), bool(getattr(experts, "has_bias", False)),
                        bool(getattr(experts, "is_concatenated", True)))


def split_gate_up(w: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[2I, ...] -> gate [I, ...], up [I, ...] (views)."""
    return w.chunk(2, dim=0) if concatenated else (w[0::2], w[1::2])


def join_gate_up(g: torch.Tensor, u: torch.Tensor, concatenated: bool, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`split_gate_up` along ``dim`` (0 for weights and biases, -1 for activations)."""
    if concatenated:
        return torch.cat([g, u], dim=dim)
    d = dim % g.dim()
    return torch.stack([g, u], dim=d + 1).flatten(d, d + 1)  # g0, u0, g1, u1, ...


def expert_weights(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Expert ``e`` as nn.Linear-shaped tensors: gate_proj / up_proj [I, H], down_proj [H, I]
    (+ ``*_bias``). Views into the fused tensors where the layout allows."""
    lay = layout_of(experts)
    gu = experts.gate_up_proj[e]
    gu = gu.T if lay.transposed else gu  # [2I, H]
    dn = experts.down_proj[e]
    g, u = split_gate_up(gu, lay.concatenated)
    out = {"gate_proj": g, "up_proj": u, "down_proj": dn.T if lay.transposed else dn}
    if lay.has_bias:
        bg, bu = split_gate_up(experts.gate_up_proj_bias[e], lay.concatenated)
        out.update(gate_proj_bias=bg, up_proj_bias=bu, down_proj_bias=experts.down_proj_bias[e])
    return out


@torch.no_grad()
def write_expert(experts: nn.Module, e: int, w: dict[str, torch.Tensor]) -> None:
    """Copy nn.Linear-shaped tensors (as :func:`expert_weights` gives them) into expert ``e`` of a
    fused module, in place; the one writer of the fused layout for a single expert."""
    lay = layout_of(experts)
    gu = join_gate_up(w["gate_proj"], w["up_proj"], lay.concatenated)  # [2I, H]
    experts.gate_up_proj[e].copy_(gu.T if lay.transposed else gu)
    experts.down_proj[e].copy_(w["down_proj"].T if lay.transposed else w["down_proj"])
    if lay.has_bias:
        experts.gate_up_proj_bias[e].copy_(join_gate_up(w["gate_proj_bias"], w["up_proj_bias"], lay.concatenated))
        experts.down_proj_bias[e].copy_(w["down_proj_bias"])


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` on rows ``x [c, H]`` -> (down_proj input [c, I], down_proj output [c, H]).

    Fused modules compute with their 3D tensors in place (no copy); per-expert modules
    (:class:`secompress.layout.PerExpertExperts`, quantized or not) with their Linear layers.
    """
    act = expert_act(experts, e, x)
    return act, expert_down(experts, e, act)


def expert_act(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """The first half of :func:`expert_forward`: rows ``x [c, H]`` -> down_proj input [c, I]."""
    per = getattr(experts, "per_expert", None)
    if per is not None:
        m = per[e]
        return experts._apply_gate(join_gate_up(m.gate_proj(x), m.up_proj(x), experts.is_concatenated, dim=-1))
    lay = layout_of(experts)
    w = experts.gate_up_proj[e]
    gu = x @ w if lay.transposed else x @ w.T  # [c, 2I]
    if lay.has_bias:
        gu = gu + experts.gate_up_proj_bias[e]
    return experts._apply_gate(gu)  # [c, I]


def expert_down(experts: nn.Module, e: int, act: torch.Tensor) -> torch.Tensor:
    """The second half of :func:`expert_forward`: down_proj input ``act [c, I]`` -> output [c, H]."""
    per = getattr(experts, "per_expert", None)
    if per is not None:
        return per[e].down_proj(act)
    lay = layout_of(experts)
    w = experts.down_proj[e]
    y = act @ w if lay.transposed else act @ w.T  # [c, H]
    if lay.has_bias:
        y = y + experts.down_proj_bias[e]
    return y


def grouped_forward(experts: nn.Module, x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of a fused module on rows sorted by expert: ``x [R, H]`` holds ``counts[e]`` rows
    for expert ``e``, in expert order -> (down_proj input [R, I], down_proj output [R, H]).

    Each expert's rows are computed as :func:`expert_forward` computes them (the same matmul per
    expert, written into its slice of one output; bias added in place), and the activation runs
    once over all rows. The weights are read once (a quantized module dequantizes them here once).
    """
    lay = layout_of(experts)
    gu = _grouped_linear(x, experts.gate_up_proj, counts, lay.transposed,
                         experts.gate_up_proj_bias if lay.has_bias else None)  # [R, 2I]
    act = experts._apply_gate(gu)  # [R, I]
    del gu
    y = _grouped_linear(act, experts.down_proj, counts, lay.transposed,
                        experts.down_proj_bias if lay.has_bias else None)  # [R, H]
    return act, y


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int], transposed: bool,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """x [R, In] sorted by expert, w [E, O, In] ([E, In, O] transposed) -> [R, O]: one matmul per expert."""
    O = w.shape[-1] if transposed else w.shape[-2]
    out = torch.empty(x.shape[0], O, dtype=torch.result_type(x, w), device=x.device)  # [R, O]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = slice(start, start + c)
        torch.matmul(x[rows], w[e] if transposed else w[e].T, out=out[rows])
        if bias is not None:
            out[rows] += bias[e]
        start += c
    return out


def fused_from(experts: nn.Module, weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`expert_weights` over all experts: nn.Linear-shaped tensors per expert
    (gate_proj / up_proj [I, H], down_proj [H, I], + ``*_bias``) -> the module's fused tensors
    (``gate_up_proj`` [E, 2I, H] or transposed [E, H, 2I], ``down_proj`` [E, H, I] or [E, I, H],
    biases) in its own layout. ``I`` may differ from the module's (neuron pruning)."""
    lay = layout_of(experts)
    gu = torch.stack([join_gate_up(w["gate_proj"], w["up_proj"], lay.concatenated) for w in weights])  # [E, 2I, H]
    dn = torch.stack([w["down_proj"] for w in weights])  # [E, H, I]
    out = {"gate_up_proj": gu.transpose(1, 2) if lay.transposed else gu,
           "down_proj": dn.transpose(1, 2) if lay.transposed else dn}
    if lay.has_bias:
        out["gate_up_proj_bias"] = torch.stack([join_gate_up(w["gate_proj_bias"], w["up_proj_bias"], lay.concatenated)
                                                for w in weights])
        out["down_proj_bias"] = torch.stack([w["down_proj_bias"] for w in weights])
    return {k: v.contiguous() for k, v in out.items()}
