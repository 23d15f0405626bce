"""Weight and activation quantizers of the compressed-tensors schemes: pure tensor math.

One :class:`QArgs` describes one quantized operand (a weight or a layer's input activation) as
compressed-tensors' ``QuantizationArgs`` does; every function here reproduces compressed-tensors
0.20.1 bit for bit (``calculate_qparams``, ``generate_gparam``, ``generate_mx_scales``,
``_quantize_dequantize``, ``_quantize``, ``_dequantize``; tested against the library):

- FP8 E4M3 (``float``, 8 bits): ``s = amax / 448`` per tensor, per output channel, per
  128 x 128 block or per token / per group of 128 (dynamic); ``q = fp8(clamp(x / s))``;
- INT8 (``int``, 8 bits, symmetric): ``s = amax / 127.5``, ``q = clamp(round(x / s), -128, 127)``
  (compressed-tensors' range is the full [-128, 127]: ``bit_range / 2``);
- NVFP4 (``float``, 4 bits, ``tensor_group`` 16): a float32 global scale ``g = 448 * 6 / amax``
  over the tensor, per group of 16 an FP8 E4M3 scale ``fp8(amax_g / 6 * g)``, values E2M1
  (0, 0.5, 1, 1.5, 2, 3, 4, 6; ties to even), ``x ~ q * s / g``;
- MXFP4 (``float``, 4 bits, ``group`` 32, uint8 scales): per group of 32 a power-of-two
  E8M0 scale ``2^(floor(log2(round_pow2(amax))) - 2)``, values E2M1.

Dynamic activation scales are computed per token (reduction over the last dimension; the
server's rule: compressed-tensors' own fake-quant reduces a 2-D ``[T, H]`` input over the whole
tensor) or per group. Symmetric quantization only (every scheme secompress serves).
Legend: O out features, In in features, G groups per row, T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of the 4-bit codes 0..7 (bit 3: sign)
STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group")
_MX_OFFSET = {4: 2, 8: 8}  # floor(log2(type max)): E2M1 6.0 -> 2, E4M3 448 -> 8


@dataclass(frozen=True)
class QArgs:
    """One quantized operand, as compressed-tensors' ``QuantizationArgs`` describes it."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # one of STRATEGIES
    group_size: int | None = None
    block: tuple[int, int] | None = None  # (rows, cols) of a block-strategy weight
    dynamic: bool | str = False  # False: static scale; True: computed at run time; "local": NVFP4's local scales
    scale_dtype: torch.dtype | None = None  # fp8 (NVFP4), uint8 (MX: E8M0 exponents), None: the operand's dtype

    def __post_init__(self):
        if self.type not in ("int", "float"):
            raise ValueError(f"type must be 'int' or 'float', got {self.type!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.type == "float" and self.num_bits not in (4, 8):
            raise ValueError(f"float quantization has 4 or 8 bits here, got {self.num_bits}")
        if self.type == "int" and not 2 <= self.num_bits <= 8:
            raise ValueError(f"int quantization has 2..8 bits, got {self.num_bits}")
        if self.strategy in ("group", "tensor_group") and not (self.group_size and self.group_size > 0):
            raise ValueError(f"strategy {self.strategy} needs a positive group_size")
        if (self.strategy == "block") != (self.block is not None):
            raise ValueError("a block size goes with strategy 'block' and only with it")
        if self.dynamic not in (False, True, "local"):
            raise ValueError(f"dynamic must be False, True or 'local', got {self.dynamic!r}")
        if self.dynamic == "local" and self.strategy != "tensor_group":
            raise ValueError("dynamic 'local' needs strategy tensor_group (NVFP4)")

    @property
    def is_mx(self) -> bool:
        """E8M0 power-of-two group scales (compressed-tensors' ``should_generate_mx_scales``)."""
        return self.type == "float" and self.group_size == 32 and self.scale_dtype == torch.uint8

    @property
    def has_global_scale(self) -> bool:
        return self.strategy == "tensor_group"

    @property
    def static(self) -> bool:
        """A scale (or NVFP4 global scale) fixed by calibration and stored with the weights."""
        return self.dynamic is not True


# ---- ranges and rounding ------------------------------------------------------------------------
def qrange(args: QArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_min, q_max) as 0-dim float32 tensors (compressed-tensors' ``calculate_range``)."""
    if args.type == "int":
        hi, lo = 2.0 ** args.num_bits / 2 - 1, -(2.0 ** args.num_bits) / 2
    else:
        hi = FP8_MAX if args.num_bits == 8 else FP4_MAX
        lo = -hi
    return torch.tensor(lo, device=device), torch.tensor(hi, device=device)


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4)."""
    a = x.abs()
    out = torch.full_like(a, 6.0)
    # upper edge of each value's bucket and whether the edge itself belongs to it (the even code)
    for value, edge, inclusive in ((0.0, 0.25, True), (0.5, 0.75, False), (1.0, 1.25, True), (1.5, 1.75, False),
                                   (2.0, 2.5, True), (3.0, 3.5, False), (4.0, 5.0, True)):
        inside = (a <= edge) if inclusive else (a < edge)
        out = torch.where(inside & (out == 6.0), torch.full_like(a, value), out)
    return out * torch.sign(x)


def _round(scaled: torch.Tensor, args: QArgs, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clamp and round to the quantized grid, kept in the input's dtype (``round_to_quantized_type_args``)."""
    t = torch.clamp(scaled, lo, hi)
    if args.type == "int":
        return torch.round(t).to(scaled.dtype)
    if args.num_bits == 8:
        return t.to(FP8).to(scaled.dtype)
    return round_fp4(t).to(scaled.dtype)


def round_to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round_to_quantized_type_dtype``: clamp to ``dtype``'s range, cast there and back."""
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        return torch.clamp(t, info.min, info.max).to(dtype).to(t.dtype)
    info = torch.iinfo(dtype)
    return torch.round(torch.clamp(t, info.min, info.max)).to(dtype).to(t.dtype)


# ---- scales -------------------------------------------------------------------------------------
def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 global scale ``448 * 6 / amax`` ([1]; 1.0 where amax is 0/NaN/inf), ``generate_gparam``."""
    a = torch.clamp(amax.reshape(1), min=torch.finfo(amax.dtype).tiny)
    g = FP8_MAX * FP4_MAX / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def round_pow2(x: torch.Tensor, elem_mantissa: int = 1) -> torch.Tensor:
    """compressed-tensors' ``round_to_power_2``: add half of the element type's mantissa step, keep sign+exponent."""
    bits = {torch.float32: (torch.int32, 23, 8), torch.bfloat16: (torch.int16, 7, 8),
            torch.float16: (torch.int16, 10, 5)}
    if x.dtype not in bits:
        raise TypeError(f"unsupported scale dtype {x.dtype}")
    itype, mant, expo = bits[x.dtype]
    width = 8 * x.element_size()
    i = x.view(itype).to(torch.int64) & ((1 << width) - 1)  # the bits, unsigned
    mask = ((1 << (expo + 1)) - 1) << mant
    r = (i + (1 << (mant - elem_mantissa - 1))) & mask
    r = torch.where(r >= 1 << (width - 1), r - (1 << width), r)  # back to the signed view of the same bits
    return r.to(itype).view(x.dtype)


def _dtype_eps(dtype: torch.dtype) -> float:
    if dtype == FP8:
        return 0.125
    return torch.finfo(dtype).eps if dtype.is_floating_point else 1


def scale_from_minmax(amin: torch.Tensor, amax: torch.Tensor, args: QArgs,
                      gscale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric scale(s) from observed min/max (``calculate_qparams``): ``max(|min|, |max|) / (range / 2)``,
    times the NVFP4 global scale, rounded to ``args.scale_dtype`` (FP8 values / E8M0 exponents turned back
    into powers of two), zeros replaced by the scale dtype's eps. Same dtype as ``amax``."""
    amin = torch.min(amin, torch.zeros_like(amin))
    amax = torch.max(amax, torch.zeros_like(amax))
    lo, hi = qrange(args, amax.device)
    pos = torch.max(amin.abs(), amax.abs())
    if args.is_mx:
        s = 127 + torch.floor(torch.log2(round_pow2(pos, 1 if args.num_bits == 4 else 3))) - _MX_OFFSET[args.num_bits]
    else:
        s = pos / ((hi - lo).to(pos.dtype) / 2)
    if gscale is not None:
        s = gscale * s
    if args.scale_dtype is not None:
        s = round_to_dtype(s, args.scale_dtype)
    if args.is_mx:
        s = (2.00 ** (s.to(torch.int32) - 127).to(torch.float)).to(s.dtype)
    eps = _dtype_eps(args.scale_dtype if args.scale_dtype is not None else s.dtype)
    s = torch.where(s == 0, torch.tensor(eps, dtype=s.dtype, device=s.device), s)
    return s.reshape(1) if s.ndim == 0 else s


def _pad_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    pr, pc = (-w.shape[-2]) % block[0], (-w.shape[-1]) % block[1]
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if pr or pc else w


def weight_minmax(w: torch.Tensor, args: QArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed (min, max) of a weight ``[O, In]`` per scale entry (llm-compressor's memoryless min-max
    observer): [1], [O, 1], [O, G] or [O/bh, In/bw] (blocks zero-padded)."""
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if args.strategy in ("group", "tensor_group"):
        g = w.unflatten(-1, (-1, args.group_size))  # [O, G, gs]
        return g.amin(-1), g.amax(-1)
    if args.strategy == "block":
        bh, bw = args.block
        p = _pad_blocks(w, args.block)
        b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2).flatten(-2)  # [O/bh, In/bw, bh*bw]
        return b.amin(-1), b.amax(-1)
    raise ValueError(f"a weight cannot use strategy {args.strategy}")


def weight_scale(w: torch.Tensor, args: QArgs, global_amax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, global scale or None) of weight ``w [O, In]``. NVFP4: the global scale comes from
    ``global_amax`` (default: this weight's absmax; llm-compressor fuses gate/up and q/k/v by taking
    the max over the fused weights)."""
    lo, hi = weight_minmax(w, args)
    g = None
    if args.has_global_scale:
        g = global_scale(w.abs().amax() if global_amax is None else global_amax)
    return scale_from_minmax(lo, hi, args, g), g


def dynamic_scale(x: torch.Tensor, args: QArgs, gscale: torch.Tensor | None = None) -> torch.Tensor:
    """Run-time activation scale of ``x [..., In]``: per token [..., 1] or per group [..., G]."""
    if args.strategy == "token":
        return scale_from_minmax(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    if args.strategy in ("group", "tensor_group"):
        g = x.unflatten(-1, (-1, args.group_size))
        return scale_from_minmax(g.amin(-1), g.amax(-1), args, gscale)
    if args.strategy == "tensor":
        return scale_from_minmax(x.amin().reshape(1), x.amax().reshape(1), args)
    raise ValueError(f"dynamic activations cannot use strategy {args.strategy}")


# ---- quantize / dequantize ----------------------------------------------------------------------
def _grouped(x: torch.Tensor, scale: torch.Tensor, args: QArgs, fn):
    """Apply ``fn(x_view, scale_view)`` in the layout the strategy needs, return in ``x``'s layout."""
    if args.strategy in ("group", "tensor_group"):
        while scale.ndim < 2:
            scale = scale.unsqueeze(1)
        out = fn(x.unflatten(-1, (-1, args.group_size)), scale.unsqueeze(-1))
        return out.flatten(-2)
    if args.strategy == "block":
        bh, bw = args.block
        shape = x.shape
        p = _pad_blocks(x, args.block)
        b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2)
        out = fn(b, scale.unsqueeze(-1).unsqueeze(-1)).transpose(1, 2).reshape(p.shape)
        return out[: shape[0], : shape[1]] if out.shape != shape else out
    return fn(x, scale)


def qdq(x: torch.Tensor, scale: torch.Tensor, args: QArgs, gscale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (compressed-tensors' ``fake_quantize``; group strategies return ``x``'s
    dtype, the others the scale's dtype, as the library does)."""
    lo, hi = qrange(args, x.device)

    def fn(v, s):
        if gscale is not None:
            s = s / gscale
        return _round(v / s, args, lo, hi).to(s.dtype) * s

    out = _grouped(x, scale, args, fn)
    return out.to(x.dtype) if args.strategy in ("group", "tensor_group") else out


def quantize(x: torch.Tensor, scale: torch.Tensor, args: QArgs, gscale: torch.Tensor | None = None) -> torch.Tensor:
    """The codes: FP8 as ``float8_e4m3fn``, INT8 as ``int8``, FP4 as E2M1 values in ``x``'s dtype."""
    lo, hi = qrange(args, x.device)

    def fn(v, s):
        if gscale is not None:
            s = s / gscale
        return _round(v / s, args, lo, hi)

    q = _grouped(x, scale, args, fn)
    if args.type == "int":
        return q.to(torch.int8)
    return q.to(FP8) if args.num_bits == 8 else q


def dequantize(q: torch.Tensor, scale: torch.Tensor, args: QArgs, gscale: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize` (``_dequantize``), in ``dtype`` (default: the scale's)."""
    def fn(v, s):
        if gscale is not None:
            s = s / gscale
        return v.to(s.dtype) * s

    out = _grouped(q, scale, args, fn)
    return out.to(dtype or scale.dtype)


# ---- FP4 packing (two E2M1 codes per byte, low nibble first; compressed-tensors' layout) -------
def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values [..., In] (In even) -> uint8 [..., In / 2]."""
    mag = (values.abs() * 2).to(torch.int32)
    idx = torch.zeros_like(mag)
    for code, m in enumerate((1, 2, 3, 4, 6, 8, 12), start=1):
        idx = torch.where(mag == m, code, idx)
    idx = idx | (torch.signbit(values).to(torch.int32) << 3)
    idx = idx.reshape(*values.shape[:-1], -1, 2)
    return (idx[..., 0] | (idx[..., 1] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., In / 2] -> E2M1 values [..., In]."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).to(torch.long)
    mag = torch.tensor(E2M1, device=packed.device)[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag).to(dtype)
