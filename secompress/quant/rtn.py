"""Group-wise round-to-nearest (RTN) quantization: pure tensor math, no modules, no I/O.

A weight ``w [..., O, In]`` (one matrix, or a batch ``[E, O, In]`` of experts) is cut
along its input features into groups of ``group_size`` columns; each (row, group) gets a
scale ``s`` and an integer zero point ``z`` and each element becomes an integer code

    q = clamp(round(w / s) + z, 0, 2^bits - 1),      w_hat = (q - z) * s

- asymmetric: ``s = (max - min) / (2^bits - 1)`` over the group with 0 inside [min, max],
  ``z = round(-min / s)``;
- symmetric (GPTQ's convention): ``s = 2 max|w| / (2^bits - 1)``, ``z = 2^(bits-1)``.

Either way ``|w - w_hat| <= s / 2`` per element. Scales are stored in float16, rounded
*up* so the bound holds for the stored value; codes and zeros are ``torch.uint8``.
``pack``/``unpack`` write codes as a dense bit stream (``bits`` bits per code) for disk.
Legend: O out features, In in features, G = In / group_size groups, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QTensor:
    """A quantized weight: ``codes [..., O, In]`` uint8, ``scales``/``zeros [..., O, G]``."""

    codes: torch.Tensor
    scales: torch.Tensor  # float16
    zeros: torch.Tensor  # uint8
    bits: int

    @property
    def group_size(self) -> int:
        return self.codes.shape[-1] // self.scales.shape[-1]


def check_args(bits: int, group_size: int | None, in_features: int, what: str = "weight") -> int:
    """The effective group size (None or -1: one group per row); ValueError on bad input."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size is None or group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (or None / -1 for per-row), got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input features of {what}")
    return group_size


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    h = s.to(SCALE_DTYPE)
    low = h.float() < s
    return torch.where(low, torch.nextafter(h, torch.tensor(float("inf"), dtype=SCALE_DTYPE, device=h.device)), h)


def rint(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even) of float32 / float64 values with ``|x| < 2^22``: adding and
    subtracting 1.5 * 2^23 (2^52) rounds exactly so in IEEE arithmetic. torch's vectorised round
    kernel is ~1000x slower than an add on some virtualised AVX-512 CPUs (4.5 us per element on
    the 2-core benchmark machine), and quantization rounds every weight."""
    if x.dtype not in (torch.float32, torch.float64):
        return torch.round(x)
    c = 1.5 * 2.0 ** (23 if x.dtype == torch.float32 else 52)
    return (x + c) - c


def round_codes(v: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """``clamp(round(v) + z, 0, maxq)`` (float) for zero points ``z`` in [0, maxq]; ``v`` is clamped to
    +-(maxq + 1) first, which changes no result and keeps :func:`rint` exact."""
    return torch.clamp(rint(torch.clamp(v, -maxq - 1, maxq + 1)) + z, 0, maxq)


def grid(g: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of ``g [..., n]`` (a group's weights): scale [...] float16 (rounded up, never
    0) and zero point [...] uint8, as :func:`quantize` chooses them (see the module docstring)."""
    maxq = 2 ** bits - 1
    g = g.detach().float()
    if symmetric:
        s = _round_up_fp16(2 * g.abs().amax(-1) / maxq)
        z = torch.full(s.shape, 2 ** (bits - 1), dtype=torch.uint8, device=g.device)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # 0 inside the range
        s = _round_up_fp16((hi - lo) / maxq)
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: any scale, codes = z
    if not symmetric:
        z = rint(torch.clamp(-lo / s.float(), 0, maxq)).to(torch.uint8)
    return s, z


@torch.no_grad()
def quantize(w: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False) -> QTensor:
    """RTN-quantize ``w [..., O, In]`` group-wise along In."""
    if w.ndim < 2:
        raise ValueError(f"expected a weight [..., out, in], got shape {tuple(w.shape)}")
    In = w.shape[-1]
    gs = check_args(bits, group_size, In, f"a weight of shape {tuple(w.shape)}")
    g = w.detach().float().reshape(*w.shape[:-1], In // gs, gs)  # [..., O, G, gs]
    s, z = grid(g, bits, symmetric)  # [..., O, G]
    q = round_codes(g / s.float()[..., None], z.float()[..., None], 2 ** bits - 1)
    return QTensor(q.reshape(w.shape).to(torch.uint8), s, z, bits)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w_hat [..., O, In]`` in ``dtype`` (computed in float32, cast once)."""
    *lead, O, In = qt.codes.shape
    G = qt.scales.shape[-1]
    q = qt.codes.reshape(*lead, O, G, In // G).float()
    w = (q - qt.zeros.float()[..., None]) * qt.scales.float()[..., None]
    return w.reshape(qt.codes.shape).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten uint8 codes into a dense little-endian bit stream [ceil(n * bits / 8)] uint8."""
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, code k of a byte at bit k * bits (same stream)
        per = 8 // bits
        flat = codes.reshape(-1).to(torch.uint8)
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)  # [n / per, per]
        out = flat[:, 0].clone()
        for k in range(1, per):
            out |= flat[:, k] << (k * bits)
        return out
    flat = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    bitmat = ((flat[:, None] >> shifts) & 1).reshape(-1)  # [n * bits]
    pad = (-bitmat.numel()) % 8
    bitmat = torch.cat([bitmat, bitmat.new_zeros(pad)]).reshape(-1, 8)
    return (bitmat << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    bitmat = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    bitmat = bitmat.reshape(-1)[: n * bits].reshape(n, bits)
    return (bitmat << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(torch.uint8).reshape(shape)
