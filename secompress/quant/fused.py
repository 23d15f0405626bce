"""A layer's quantized experts kept FUSED in memory: stacked integer codes, one dequantize per forward.

transformers 5 computes a MoE layer from two fused 3D weights (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``). :class:`FusedQuantizedExperts` stores them as stacked codes per
bit-width group of experts (``codes [E_b, O, In/pack]`` uint8, ``scales``/``zeros [E_b, O, G]``)
and, on each forward, dequantizes every group once into the fused tensors and runs the original
module's own forward on them (``torch.func.functional_call``). Experts planned 16-bit stay as
stacked 16-bit tensors. So a quantized layer costs one dequantize of the layer, not a Python loop
over experts with one small matmul each: evaluation runs at about bf16 speed
(``evals/bench_fused_speed.py``).

Pure packing math at the top (:func:`pack_codes` / :func:`unpack_codes`: ``8 // bits`` codes per
byte along the input features for 2/4/8 bits; 3-bit codes, and rows that do not split evenly, stay
one per byte; zero points [E_b, O, G] one per byte).
Legend: E experts, E_b experts of one bit-width, O out features, In in features, G groups,
H hidden, I expert FFN size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..experts import join_gate_up, layout_of, split_gate_up
from . import rtn

WEIGHTS = ("gate_up_proj", "down_proj")  # the fused weights, as transformers names them
DEQUANT_CHUNK = 4  # experts dequantized at once (bounds the float32 temporaries)


# ---- pure math -----------------------------------------------------------------------------
def per_byte(bits: int, n: int) -> int:
    """Codes stored per byte for rows of ``n`` codes: 8 // bits where that packs without waste
    (2, 4, 8 bits, ``n`` a multiple), else 1."""
    k = 8 // bits if 8 % bits == 0 else 1
    return k if n % k == 0 else 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., In] -> [..., In / per_byte] uint8, code j of a byte in bits j*bits.."""
    k = per_byte(bits, codes.shape[-1])
    if k == 1:
        return codes.contiguous()
    c = codes.reshape(*codes.shape[:-1], -1, k).to(torch.int32)  # [..., In/k, k]
    shifts = torch.arange(k, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` for rows of ``n`` codes: [..., n / per_byte] -> [..., n] uint8."""
    k = per_byte(bits, n)
    if k == 1:
        return packed
    shifts = torch.arange(k, dtype=torch.uint8, device=packed.device) * bits
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).reshape(*packed.shape[:-1], -1)


# ---- the module ----------------------------------------------------------------------------
class FusedQuantizedExperts(nn.Module):
    """Drop-in replacement for a fused experts module whose experts are (partly) quantized.

    ``bits``: {expert: bit-width} of the quantized experts; ``make_expert(e)`` returns expert
    ``e``'s {"gate_proj" | "up_proj" | "down_proj": QTensor [O, In]} in the nn.Linear orientation
    (or pass ``quantized``, a dict of those). Experts are quantized and packed one at a time into
    preallocated stacked buffers, so building a layer holds the layer, its packed codes and one
    expert's unpacked codes, never every expert's. Experts missing from ``bits`` stay 16-bit,
    bit-identical. Same forward signature and result as the fused module with the dequantized
    weights written in.
    """

    def __init__(self, fused: nn.Module, quantized: dict[int, dict[str, rtn.QTensor]] | None = None, *,
                 bits: dict[int, int] | None = None, make_expert: Callable[[int], dict[str, rtn.QTensor]] | None = None):
        super().__init__()
        if quantized is not None:
            bits = {e: qts["down_proj"].bits for e, qts in quantized.items()}
            make_expert = quantized.__getitem__
        if bits is None or make_expert is None:
            raise TypeError("FusedQuantizedExperts needs quantized=, or bits= and make_expert=")
        lay = layout_of(fused)
        self.num_experts = fused.num_experts
        self.is_transposed, self.has_bias, self.is_concatenated = lay.transposed, lay.has_bias, lay.concatenated
        self.weight_dtype = fused.down_proj.dtype
        self.shapes = {w: tuple(getattr(fused, w).shape) for w in WEIGHTS}  # [E, ...] as the fused module has them
        self.group_bits: list[int] = []
        for b in sorted(set(bits.values())):
            ids = sorted(e for e, eb in bits.items() if eb == b)
            g = len(self.group_bits)
            for i, e in enumerate(ids):
                qts = make_expert(e)
                for w, qt in zip(WEIGHTS, (self._joint(qts), qts["down_proj"])):  # [2I, H], [H, I]
                    if qt.bits != b:
                        raise ValueError(f"expert {e}: {w} has {qt.bits}-bit codes, planned {b}")
                    parts = {"codes": pack_codes(qt.codes, b), "scales": qt.scales, "zeros": qt.zeros}
                    for f, t in parts.items():
                        if i == 0:  # [E_b, ...] on the codes' device, filled one expert at a time
                            self.register_buffer(f"g{g}_{w}_{f}", t.new_empty((len(ids), *t.shape)))
                        getattr(self, f"g{g}_{w}_{f}")[i] = t
                del qts
            self.register_buffer(f"g{g}_experts", torch.tensor(ids, dtype=torch.long,
                                                               device=getattr(self, f"g{g}_down_proj_codes").device))
            self.group_bits.append(b)
        quantized = bits
        dense = [e for e in range(self.num_experts) if e not in quantized]
        self.register_buffer("dense_experts", torch.tensor(dense, dtype=torch.long, device=fused.down_proj.device))
        for w in WEIGHTS:  # 16-bit experts, bit-identical, in the fused orientation
            src = getattr(fused, w).detach()
            self.register_buffer(f"dense_{w}", src[dense].clone() if dense else  # none: a real empty tensor
                                 torch.empty((0, *src.shape[1:]), dtype=src.dtype, device=self.dense_experts.device))
        if lay.has_bias:
            for w in WEIGHTS:
                setattr(self, f"{w}_bias", nn.Parameter(getattr(fused, f"{w}_bias").detach().clone(),
                                                        requires_grad=False))
        self.train(fused.training)
        self.__dict__["shell"] = fused  # not a submodule: its forward runs on the weights passed in
        with torch.no_grad():
            for name, p in list(fused.named_parameters(recurse=False)):
                setattr(fused, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def _joint(self, qts: dict[str, rtn.QTensor]) -> rtn.QTensor:
        """gate [I, H] and up [I, H] -> the fused module's gate_up rows [2I, H] (its interleave rule)."""
        g, u = qts["gate_proj"], qts["up_proj"]
        return rtn.QTensor(*(join_gate_up(getattr(g, f), getattr(u, f), self.is_concatenated)
                             for f in ("codes", "scales", "zeros")), g.bits)

    # ---- reading the codes back ------------------------------------------------------------
    def group_qtensor(self, g: int, w: str) -> rtn.QTensor:
        """Group ``g``'s stacked codes of fused weight ``w`` (rows in nn.Linear orientation)."""
        b, n = self.group_bits[g], self.shapes[w][-2 if self.is_transposed else -1]  # In
        return rtn.QTensor(unpack_codes(getattr(self, f"g{g}_{w}_codes"), b, n), getattr(self, f"g{g}_{w}_scales"),
                           getattr(self, f"g{g}_{w}_zeros"), b)

    def _expert_qtensor(self, g: int, w: str, i: int) -> rtn.QTensor:
        """Row ``i`` of group ``g``'s codes of fused weight ``w``, unpacked alone."""
        b, n = self.group_bits[g], self.shapes[w][-2 if self.is_transposed else -1]  # In
        return rtn.QTensor(unpack_codes(getattr(self, f"g{g}_{w}_codes")[i], b, n), getattr(self, f"g{g}_{w}_scales")[i],
                           getattr(self, f"g{g}_{w}_zeros")[i], b)

    def quantized_experts(self) -> dict[int, tuple[int, int]]:
        """expert -> (group, row in the group)."""
        return {int(e): (g, i) for g in range(len(self.group_bits))
                for i, e in enumerate(getattr(self, f"g{g}_experts").tolist())}

    def qtensor(self, e: int, proj: str) -> rtn.QTensor | None:
        """Expert ``e``'s ``proj`` (gate_proj / up_proj / down_proj) as an [O, In] QTensor; None if 16-bit."""
        where = self.quantized_experts().get(e)
        if where is None:
            return None
        g, i = where
        if proj == "down_proj":
            return self._expert_qtensor(g, "down_proj", i)
        joint = self._expert_qtensor(g, "gate_up_proj", i)  # [2I, H]
        parts = [split_gate_up(getattr(joint, f), self.is_concatenated) for f in ("codes", "scales", "zeros")]
        k = 0 if proj == "gate_proj" else 1
        return rtn.QTensor(parts[0][k], parts[1][k], parts[2][k], joint.bits)

    def nbytes_quantized(self) -> int:
        """Bytes held, with codes and zero points counted at their bit-width (as on disk)."""
        total = sum(t.numel() * t.element_size() for n, t in self.named_buffers(recurse=False)
                    if n.startswith("dense_") and n != "dense_experts")
        total += sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))
        for g, b in enumerate(self.group_bits):
            for w in WEIGHTS:
                qt = self.group_qtensor(g, w)
                total += (qt.codes.numel() * b + 7) // 8 + (qt.zeros.numel() * b + 7) // 8
                total += qt.scales.numel() * qt.scales.element_size()
        return total

    # ---- computing ---------------------------------------------------------------------------
    def fused_weights(self) -> dict[str, torch.Tensor]:
        """The fused weights ``gate_up_proj`` / ``down_proj`` dequantized into one preallocated tensor
        each, a few experts at a time (float32 temporaries stay a few experts' size, whatever E is)."""
        out = {}
        for w in WEIGHTS:
            dense = getattr(self, f"dense_{w}")
            if not self.group_bits:
                out[w] = dense
                continue
            dev = getattr(self, f"g0_{w}_codes").device  # (an empty dense buffer may stay on meta)
            full = torch.empty(self.shapes[w], dtype=self.weight_dtype, device=dev)  # [E, ...]
            for g, b in enumerate(self.group_bits):
                ids = getattr(self, f"g{g}_experts")
                codes, scales, zeros = (getattr(self, f"g{g}_{w}_{f}") for f in ("codes", "scales", "zeros"))
                n = self.shapes[w][-2 if self.is_transposed else -1]  # In
                for a in range(0, ids.numel(), DEQUANT_CHUNK):
                    z = min(a + DEQUANT_CHUNK, ids.numel())
                    qt = rtn.QTensor(unpack_codes(codes[a:z], b, n), scales[a:z], zeros[a:z], b)
                    deq = rtn.dequantize(qt, self.weight_dtype)  # [c, O, In]
                    full[ids[a:z]] = deq.transpose(-1, -2) if self.is_transposed else deq
            if self.dense_experts.numel():
                full[self.dense_experts] = dense
            out[w] = full
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K]
        params = self.fused_weights()
        if self.has_bias:
            params.update({f"{w}_bias": getattr(self, f"{w}_bias") for w in WEIGHTS})
        return functional_call(self.shell, params, (hidden_states, top_k_index, top_k_weights))

    def _apply_gate(self, gu):  # expert_forward (profiling hooks) calls the activation of the module
        return self.shell._apply_gate(gu)

    @property
    def gate_up_proj(self) -> torch.Tensor:  # read one expert at a time by secompress.experts (slow path)
        return self.fused_weights()["gate_up_proj"]

    @property
    def down_proj(self) -> torch.Tensor:
        return self.fused_weights()["down_proj"]

    # ---- the fused module back (export of dequantized weights) --------------------------------
    @torch.no_grad()
    def to_fused(self) -> nn.Module:
        """The fused module with the dequantized weights written in (fresh tensors)."""
        for name, t in self.fused_weights().items():
            setattr(self.shell, name, nn.Parameter(t.clone(), requires_grad=False))
        if self.has_bias:
            for w in WEIGHTS:
                setattr(self.shell, f"{w}_bias", nn.Parameter(getattr(self, f"{w}_bias").detach().clone(),
                                                              requires_grad=False))
        return self.shell

    def release_fused(self) -> None:
        for name, p in list(self.shell.named_parameters(recurse=False)):
            setattr(self.shell, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, bits={self.group_bits}, "
                f"16-bit experts={self.dense_experts.numel()}")
