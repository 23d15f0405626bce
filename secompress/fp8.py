"""Block-scaled FP8 weights as DeepSeek-V3/R1 and the Qwen3 FP8 releases publish them (pure math).

A quantized linear weight ``w [R, C]`` is stored as ``weight`` in ``float8_e4m3fn`` plus
``weight_scale_inv [ceil(R/br), ceil(C/bc)]`` in float32, one scale per ``br x bc`` block
(``quantization_config.weight_block_size``, [128, 128] in the official checkpoints); the last
row/column of blocks is partial when the block does not divide the matrix (DeepSeek-V3's
``kv_a_proj_with_mqa`` is 576 rows: 4.5 blocks). ``w = weight * weight_scale_inv`` block by block,
which is DeepSeek's reference ``weight_dequant`` (inference/kernel.py). Legend: R rows (output
features), C columns (input features), br x bc block, Rb = ceil(R/br), Cb = ceil(C/bc).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SecompressError, UnsupportedQuantizationError

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class BlockFP8:
    """The understood subset of a ``quant_method: fp8`` quantization_config."""

    block: tuple[int, int] = (128, 128)  # (br, bc)

    def __post_init__(self):
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"weight_block_size must be two positive ints, got {self.block}")

    @classmethod
    def from_config(cls, qc) -> "BlockFP8 | None":
        """The format of a config's ``quantization_config`` (dict or transformers object), None if unquantized;
        raises :class:`UnsupportedQuantizationError` for anything else (gptq, awq, bnb, compressed-tensors,
        ue8m0 scales, per-tensor FP8, FP4 experts)."""
        if qc is None:
            return None
        d = qc if isinstance(qc, dict) else qc.to_dict()
        method = str(d.get("quant_method", "")).lower()
        if method != "fp8":
            raise UnsupportedQuantizationError(
                f"the checkpoint is quantized with '{method or d}'; secompress reads unquantized checkpoints and "
                "block-scaled FP8 (quant_method fp8, DeepSeek-V3/Qwen3-FP8 style) only (MXFP4 in memory only, "
                "dequantized by transformers): dequantize it first")
        block = d.get("weight_block_size")
        if block is None:
            raise UnsupportedQuantizationError("FP8 checkpoint without weight_block_size (per-tensor FP8) "
                                               "is not supported; only block-scaled FP8 is")
        for key, ok in (("scale_fmt", ("float", None)), ("expert_dtype", ("fp8", None)), ("fmt", ("e4m3", None))):
            if d.get(key) not in ok:
                raise UnsupportedQuantizationError(f"FP8 checkpoint with {key}={d.get(key)!r} is not supported "
                                                   f"(only {ok[0]!r})")
        return cls(block=tuple(int(b) for b in block))


def grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """(Rb, Cb): the scale grid of an [R, C] matrix, partial last blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _expand(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[Rb, Cb] per-block values -> [R, C] per element (partial last blocks cropped)."""
    return s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [R, C] float8 codes, scale_inv [Rb, Cb] -> w [R, C] in ``dtype`` (computed in float32)."""
    if q.dim() != 2:
        raise SecompressError(f"block-scaled FP8 weight must be 2D, got shape {tuple(q.shape)}")
    want = grid(tuple(q.shape), block)
    if tuple(scale_inv.shape) != want:
        raise SecompressError(f"FP8 weight {tuple(q.shape)} with block {list(block)} needs a scale grid {want}, "
                              f"the checkpoint has {tuple(scale_inv.shape)}")
    w = q.to(torch.float32)  # [R, C]
    w.mul_(_expand(scale_inv.to(torch.float32), tuple(q.shape), block))
    return w.to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (q [R, C] float8_e4m3fn, scale_inv [Rb, Cb] float32): each block's absmax maps to 448."""
    R, C = w.shape
    Rb, Cb = grid((R, C), block)
    pad = torch.zeros(Rb * block[0], Cb * block[1], dtype=torch.float32)  # [Rb*br, Cb*bc]
    pad[:R, :C] = w.float()
    amax = pad.view(Rb, block[0], Cb, block[1]).abs().amax(dim=(1, 3))  # [Rb, Cb]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / _expand(scale_inv, (R, C), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv
