"""bitsandbytes backend: real 4-bit (NF4/FP4) and 8-bit (LLM.int8) modules, fused experts included.

transformers' bitsandbytes integration replaces ``nn.Linear`` modules only, so the fused 3D
experts of a transformers-5 MoE stay 16-bit without a word. Here every planned expert is
moved to the per-expert layout (:class:`~secompress.layout.PerExpertExperts`) and each of its
projections becomes a ``bnb.nn.Linear4bit`` / ``Linear8bitLt``; Super Experts planned at 16 bit
stay ``nn.Linear`` with their original weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import require
from ..checkpoints import check_model
from ..layout import PROJ, PerExpertExperts
from .modules import planned_expert_layers, planned_linears
from .plan import QuantPlan

BNB_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")


def check_plan(plan: QuantPlan) -> None:
    bad = sorted(n for n, b in plan.bits.items() if b is not None and b not in BNB_BITS)
    if bad:
        raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits only; the plan asks other widths for "
                         f"{len(bad)} modules (first: {bad[0]} at {plan.bits[bad[0]]} bits)")


_LINEAR8 = []  # the Linear8bitLt subclass below, built on first use (bitsandbytes is an optional extra)


def linear8bit_class():
    """``bnb.nn.Linear8bitLt`` that accepts inputs of any rank: bitsandbytes' int8 matmul takes at
    most 3D inputs, and DeepSeek's MLA feeds ``kv_b_proj`` a 4D tensor. Same state dict."""
    if not _LINEAR8:
        bnb = require("bitsandbytes", "bnb", "quantization method 'bnb'")

        class Linear8bitLtND(bnb.nn.Linear8bitLt):
            def forward(self, x):
                if x.dim() <= 3:
                    return super().forward(x)
                return super().forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)

        _LINEAR8.append(Linear8bitLtND)
    return _LINEAR8[0]


@torch.no_grad()
def to_bnb(lin: nn.Linear, bits: int, quant_type: str = "nf4") -> nn.Module:
    """A bitsandbytes module holding ``lin``'s weight quantized (uint8 / int8 storage)."""
    bnb = require("bitsandbytes", "bnb", "quantization method 'bnb'")
    dev, bias = lin.weight.device, lin.bias is not None
    if bits == 4:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=lin.weight.dtype,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().to("cpu").clone(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=False)
    elif bits == 8:
        q = linear8bit_class()(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                               device="meta")
        q.weight = bnb.nn.Int8Params(lin.weight.detach().to("cpu").clone(), requires_grad=False,
                                     has_fp16_weights=False)
    else:
        raise ValueError(f"bitsandbytes supports 4 or 8 bits, not {bits}")
    if bias:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    q = q.to(dev)  # moving a bnb module is what quantizes its weight
    keep_canonical_layout(q)
    return q.train(lin.training)


def keep_canonical_layout(q: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights (0.50, AVX512-BF16 CPUs, first eval
    forward). It fails unless in_features is a multiple of 64 and out_features of 32, and its
    inverse, which ``state_dict()`` runs, leaves ``absmax`` transposed and in bf16: a checkpoint
    saved after a forward would load wrong wherever in_features > 64."""
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = False


@torch.no_grad()
def apply_bnb(model, plan: QuantPlan, quant_type: str = "nf4") -> None:
    """Replace each planned unit by a bitsandbytes module (in place)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb quant_type must be one of {QUANT_TYPES}, got '{quant_type}'")
    check_plan(plan)
    require("bitsandbytes", "bnb", "quantization method 'bnb'")
    adapter = check_model(model)
    for _, parent, attr, lin, b in list(planned_linears(model, plan)):
        setattr(parent, attr, to_bnb(lin, b, quant_type))
    for block, experts, todo in list(planned_expert_layers(model, plan, adapter)):
        per = PerExpertExperts(experts)
        for e, (_, bits) in todo.items():
            for p in PROJ:
                setattr(per.per_expert[e], p, to_bnb(getattr(per.per_expert[e], p), bits, quant_type))
        setattr(block, adapter.experts, per)
