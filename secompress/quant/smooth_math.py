"""Smoothing factors: pure math (SmoothQuant, EAQuant's expert-aware aggregation and outlier channels).

SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) moves activation outliers into the weights with an
exact per-channel rescaling ``X W^T = (X / s)(W s)^T``, ``s_j = max|X_j|^a / max|W_j|^(1-a)``.

EAQuant (Fu et al. 2025, "EAQuant: Enhancing Post-Training Quantization for MoE Models via Expert-Aware
Optimization", arXiv 2506.13329; code github.com/darren-fzq1/EAQuant, ``quantize/smooth.py``):

- *expert-aware smoothing aggregation*: the experts and the router of an MoE layer read one tensor,
  so one vector ``s`` is folded into the norm before them; per expert ``i`` the SmoothQuant factor
  from the tokens routed to it and its gate/up columns, and ``s_j = max(router_j, max_i s_ij)`` (the
  paper's rule; the code's default ``max`` mode leaves the router term out unless ``_gate`` is asked);
- *outlier channels of the down projection* (``calcu_outlier_mask``): channels whose max input lies
  above ``q3 + 1.5 IQR`` (quantiles at ``ratio`` / ``1 - ratio``), refined among them by the code's
  gap rule (its ``otsu()``), get ``s_j = (max_j / max_normal)^rate`` (rate 0.7), the others 1. A Super Expert's massive
  neuron is such a channel. The code uses the signed per-channel max and min; secompress keeps
  |x| per channel, so one side.

Legend: E experts, In in features, O out features.
"""
from __future__ import annotations

import torch

CLAMP = 1e-5  # SmoothQuant / EAQuant clamp of factors and statistics


def smoothquant_factor(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s [In] = max|X|^alpha / max|W|^(1-alpha)`` (both clamped at 1e-5)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, w = act_amax.float().clamp(min=CLAMP), weight_amax.float().clamp(min=CLAMP)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=CLAMP)


def column_amax(weights) -> torch.Tensor:
    """max |W[:, j]| over the rows of every weight ``[O, In]`` (or stacked ``[..., O, In]``) given."""
    return torch.stack([w.detach().abs().float().reshape(-1, w.shape[-1]).amax(0) for w in weights]).amax(0)


def aggregate(expert_factors: torch.Tensor, router_factor: torch.Tensor | None = None,
              shared_factor: torch.Tensor | None = None) -> torch.Tensor:
    """EAQuant's aggregation: ``s_j = max(router_j, shared_j, max_i s_ij)`` over experts ``[E, In]``."""
    s = expert_factors.float().amax(0)
    for extra in (router_factor, shared_factor):
        if extra is not None:
            s = torch.maximum(s, extra.float())
    return s


def gap_split(values: torch.Tensor) -> float:
    """EAQuant's ``otsu()`` (``quantize/outlier_finder.py``; a gap rule, not Otsu's variance criterion):
    over the values sorted in descending order, the cut maximising ``min(upper) - max(lower) - var(lower)``;
    returns ``max(lower)``: the values above it are the outliers."""
    d = values.float().flatten().sort(descending=True).values
    best, cut = -float("inf"), float(d[-1])
    for i in range(d.numel() - 1):
        low = d[i + 1:]
        metric = float(d[i] - d[i + 1]) - (float(low.var()) if low.numel() > 1 else 0.0)
        if metric > best:
            best, cut = metric, float(d[i + 1])
    return cut


def outlier_factor(channel_amax: torch.Tensor, ratio: float = 0.65, iqr_factor: float = 1.5,
                   rate: float = 0.7) -> torch.Tensor:
    """EAQuant's down-projection factor ``[In]``: 1 for normal channels, ``(max_j / max_normal)^rate`` for
    outlier channels (above ``q(ratio) + iqr_factor * IQR``, then above :func:`gap_split`'s cut among those)."""
    x = channel_amax.float()
    q1, q3 = torch.quantile(x, 1 - ratio), torch.quantile(x, ratio)
    cut = float(q3 + iqr_factor * (q3 - q1))
    if int((x > cut).sum()) > 1:
        cut = max(cut, gap_split(x[x > cut]))
    out = torch.ones_like(x)
    outliers = x > cut
    if not outliers.any() or outliers.all():
        return out
    normal = x[~outliers].max().clamp(min=CLAMP)
    out[outliers] = (x[outliers] / normal).pow(rate)
    return out
