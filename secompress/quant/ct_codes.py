"""secompress's integer codes <-> compressed-tensors' signed integer codes: pure tensor math.

secompress (:mod:`secompress.quant.rtn`) stores unsigned codes ``q`` and zero points ``z`` in
``[0, 2^b)`` with ``w = (q - z) * s``. compressed-tensors' INT schemes use signed values in
``[-2^(b-1), 2^(b-1))``: ``w = (q' - z') * s`` (symmetric: no ``z'``). So
``q' = q - 2^(b-1)``, ``z' = z - 2^(b-1)``; a symmetric scheme needs ``z = 2^(b-1)`` everywhere
(GPTQ ``sym=True`` and RTN ``symmetric=True`` give exactly that).

Scales: :func:`to_signed` gives them in float32 (they are float16 values here, so float32 holds
them exactly and compressed-tensors' packer recovers the very codes); the writer stores them in the
export dtype (bf16, what vLLM computes with) or float32 (``scale_dtype``). :func:`from_signed` keeps
16-bit stored scales as they are (secompress then dequantizes as a server does), and turns float32
ones back into float16 when they are float16 values. Legend: O out features, In in features, G groups.
"""
from __future__ import annotations

import torch

from ..errors import SecompressError
from . import rtn


def to_signed(qt: rtn.QTensor, symmetric: bool, what: str = "weight"):
    """(codes int8 [O, In], scale float32 [O, G], zero point int8 [O, G] or None) of ``qt``."""
    off = 2 ** (qt.bits - 1)
    if symmetric and not bool((qt.zeros == off).all()):
        raise SecompressError(f"{what}: zero points differ from {off}, so it is asymmetric and cannot go in a "
                              "symmetric compressed-tensors scheme (quantize with symmetric=True, or export "
                              "with symmetric: false)")
    codes = (qt.codes.to(torch.int16) - off).to(torch.int8)
    zp = None if symmetric else (qt.zeros.to(torch.int16) - off).to(torch.int8)
    return codes, qt.scales.to(torch.float32), zp


def from_signed(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int,
                what: str = "weight") -> rtn.QTensor:
    """Inverse of :func:`to_signed`; scales as stored (float32 ones as float16 when they are float16 values)."""
    off = 2 ** (bits - 1)
    s16 = scale
    if scale.dtype == torch.float32:
        s16 = scale.to(rtn.SCALE_DTYPE)
        if not torch.equal(s16.to(scale.dtype), scale):
            s16 = scale  # not secompress's float16 scales: kept exact
    q = (codes.to(torch.int16) + off).to(torch.uint8)
    z = torch.full(scale.shape, off, dtype=torch.uint8) if zp is None else (zp.to(torch.int16) + off).to(torch.uint8)
    return rtn.QTensor(q, s16, z.to(codes.device), bits)
