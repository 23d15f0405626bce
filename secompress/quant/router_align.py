"""EAQuant's router-logits distribution alignment, for a router whose weight gets quantized.

EAQuant (Fu et al. 2025, arXiv 2506.13329v2, Sec. 3.2 "Router Logits Distribution Alignment"; code
``quantize/quantizer.py``, ``per_token_dynamic_calibration_V2`` with the router's default
``per_channel_kl_top0``) calibrates the router's weight quantizer so that the quantized router keeps the
full-precision router's expert choice: it searches a clipping ratio ``r`` in [0.35, 1] (101 steps) of
the weight's range and keeps the one minimising the KL divergence between the full-precision routing
distribution and the quantized one on the full-precision top-k experts of each calibration token
(``KL(softmax(z)[topk] || log_softmax(z_q)[topk])``, batch mean). A scalar loss, so one ratio for the
whole weight, as in the code.

Serving note: vLLM and SGLang keep MoE routers unquantized (the gate is in ``ignore``), so this matters
only where a runtime quantizes the router; secompress keeps routers 16-bit by default.
Legend: T tokens, E experts, H hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from . import floatq


def topk_kl(ref_logits: torch.Tensor, logits: torch.Tensor, k: int) -> float:
    """EAQuant's routing loss: KL on the reference's top-k experts, batch mean over tokens ([T, E] logits)."""
    idx = ref_logits.float().topk(k, -1).indices
    ref = F.softmax(ref_logits.float(), -1).gather(-1, idx)
    can = F.log_softmax(logits.float(), -1).gather(-1, idx)
    return float(F.kl_div(can, ref, reduction="batchmean"))


def topk_agreement(ref_logits: torch.Tensor, logits: torch.Tensor, k: int) -> float:
    """Share of tokens whose top-k expert set is unchanged."""
    a = ref_logits.topk(k, -1).indices.sort(-1).values
    b = logits.topk(k, -1).indices.sort(-1).values
    return float((a == b).all(-1).float().mean())


@dataclass(frozen=True)
class Alignment:
    weight: torch.Tensor  # [E, H] the quantized (dequantized) router weight
    ratio: float  # chosen clipping ratio
    kl: float  # routing loss with it
    kl_minmax: float  # routing loss of plain min-max (ratio 1)


@torch.no_grad()
def align_router(weight: torch.Tensor, x: torch.Tensor, args: floatq.QArgs, top_k: int,
                 bias: torch.Tensor | None = None, low: float = 0.35, steps: int = 100) -> Alignment:
    """Quantize a router ``weight [E, H]`` with ``args``, clipping its range by the ratio that best keeps
    the routing of calibration inputs ``x [T, H]`` (EAQuant Sec. 3.2)."""
    if not 0 < low <= 1 or steps < 1:
        raise ValueError("need 0 < low <= 1 and steps >= 1")
    w = weight.detach().float()
    ref = F.linear(x.float(), w, None if bias is None else bias.float())
    lo, hi = floatq.weight_minmax(w, args)
    g = floatq.global_scale(w.abs().amax()) if args.has_global_scale else None
    best = None
    for i in range(steps + 1):
        r = low + i * (1 - low) / steps
        s = floatq.scale_from_minmax(lo * r, hi * r, args, g)
        wq = floatq.qdq(w, s, args, g).to(w.dtype)
        kl = topk_kl(ref, F.linear(x.float(), wq, None if bias is None else bias.float()), top_k)
        if best is None or kl < best[1]:
            best = (r, kl, wq)
        if i == steps:
            kl_minmax = kl
    return Alignment(best[2].to(weight.dtype), best[0], best[1], kl_minmax)
