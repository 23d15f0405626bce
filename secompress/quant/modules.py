"""The quantized modules and the module swaps every in-place backend shares.

:class:`QuantizedLinear` holds integer codes (RTN, and GPTQ codes read back); a layer's fused
experts become a :class:`~secompress.quant.fused.FusedQuantizedExperts` (``QuantizedExperts``:
stacked codes kept fused, one dequantize per layer and forward). :func:`apply_plan` swaps the planned units in,
:func:`dequantized` swaps plain modules back for the duration of an export.
Legend: E experts, O out features, In in features, G groups per row.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import check_model
from ..errors import SecompressError
from ..experts import expert_weights
from ..layout import PROJ, PerExpertExperts
from . import rtn
from .fused import FusedQuantizedExperts
from .plan import QuantPlan


class QuantizedLinear(nn.Module):
    """A Linear holding uint8 codes [O, In], float16 scales and uint8 zeros [O, G]; it
    dequantizes to the original dtype on each forward."""

    codes: torch.Tensor  # [O, In] uint8
    scales: torch.Tensor  # [O, G] float16
    zeros: torch.Tensor  # [O, G] uint8

    def __init__(self, qt: rtn.QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = qt.codes.shape
        self.bits, self.weight_dtype = qt.bits, dtype
        self.register_buffer("codes", qt.codes)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("zeros", qt.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, qt: rtn.QTensor) -> "QuantizedLinear":
        return cls(qt, lin.bias, lin.weight.dtype)

    def qtensor(self) -> rtn.QTensor:
        return rtn.QTensor(self.codes, self.scales, self.zeros, self.bits)

    @property
    def weight(self) -> torch.Tensor:  # [O, In] dequantized (what the export writes)
        return rtn.dequantize(self.qtensor(), self.weight_dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.in_features // self.scales.shape[-1]}"


QuantizedExperts = FusedQuantizedExperts  # a layer's quantized experts: stacked codes, kept fused (quant/fused.py)


def planned_linears(model, plan: QuantPlan):
    """(unit name, parent module, attribute, nn.Linear, bits) of every planned unit that is not a routed expert."""
    for name, b in plan.bits.items():
        if b is None or plan.units[name].expert is not None:
            continue
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise SecompressError(f"'{name}' is a {type(lin).__name__}, not an nn.Linear: already quantized?")
        parent, _, attr = name.rpartition(".")
        yield name, model.get_submodule(parent), attr, lin, b


def planned_expert_layers(model, plan: QuantPlan, adapter):
    """(MoE block, its fused experts, {expert: (unit name, bits)}) of every layer with planned experts."""
    for layer, names in plan.moe_layers().items():
        todo = {plan.units[n].expert: (n, plan.bits[n]) for n in names if plan.bits[n] is not None}
        if not todo:
            continue
        block = adapter.block_of(adapter.layers(model)[layer])
        experts = adapter.experts_of(block)
        if isinstance(experts, (PerExpertExperts, FusedQuantizedExperts)):
            raise SecompressError(f"layer {layer}: experts are already per-expert/quantized; quantize a fused model")
        yield block, experts, todo


@torch.no_grad()
def apply_plan(model, plan: QuantPlan, make) -> None:
    """Replace each planned unit with its quantized module; ``make(key, weight [O, In], bits) -> QTensor``.

    Keys: a Linear's module name; an expert's projection ``<expert name>.<gate_proj|up_proj|down_proj>``.
    """
    adapter = check_model(model)
    for name, parent, attr, lin, b in list(planned_linears(model, plan)):
        setattr(parent, attr, QuantizedLinear.from_linear(lin, make(name, lin.weight, b)))
    for block, experts, todo in list(planned_expert_layers(model, plan, adapter)):
        def make_expert(e: int, experts=experts, todo=todo) -> dict:  # one expert at a time (peak memory)
            n, bits = todo[e]
            return {p: make(f"{n}.{p}", w, bits) for p, w in expert_weights(experts, e).items() if p in PROJ}

        setattr(block, adapter.experts, FusedQuantizedExperts(experts, bits={e: b for e, (_, b) in todo.items()},
                                                              make_expert=make_expert))


@contextmanager
def dequantized(model, experts: bool = True, layer: int | None = None):
    """Inside the block the model has plain Linear / fused modules with the dequantized weights
    (``experts=False``: quantized fused experts stay as they are; only Linear units are swapped;
    ``layer``: only decoder layer ``layer``'s modules, the others stay as they are)."""
    adapter = check_model(model)
    swaps = []  # (parent, attr, quantized module, plain module)
    inside = set()
    prefix = "" if layer is None else f"{adapter.layers_path}.{layer}."
    for i in adapter.moe_layer_indices(model):
        if layer is not None and i != layer:
            continue
        block = adapter.block_of(adapter.layers(model)[i])
        qe = adapter.experts_of(block)
        if isinstance(qe, QuantizedExperts):
            inside |= {id(m) for m in qe.modules()}
            if experts:
                swaps.append((block, adapter.experts, qe, qe.to_fused()))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear) and id(mod) not in inside and name.startswith(prefix):
            parent, _, attr = name.rpartition(".")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.weight, requires_grad=False)
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            swaps.append((model.get_submodule(parent), attr, mod, lin))
    try:
        for parent, attr, _, plain in swaps:
            setattr(parent, attr, plain)
        yield model
    finally:
        for parent, attr, q, _ in swaps:
            setattr(parent, attr, q)
            if isinstance(q, QuantizedExperts):
                q.release_fused()


def quantized_bytes(model) -> int:
    """Bytes of the model as held in memory after ``quantize_``, with codes counted at their bit-width."""
    total, inside = 0, set()
    for m in model.modules():
        if isinstance(m, FusedQuantizedExperts):
            total += m.nbytes_quantized()
            inside |= {id(t) for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False))}
        if isinstance(m, QuantizedLinear):
            total += (m.codes.numel() * m.bits + 7) // 8 + m.scales.numel() * 2 + (m.zeros.numel() * m.bits + 7) // 8
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            inside |= {id(t) for t in (m.codes, m.scales, m.zeros, m.bias) if t is not None}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total
