"""Reload of bitsandbytes-quantized MoE models (``load_bnb``); the writer is the ``bitsandbytes``
export format (:mod:`secompress.quant.formats.bnb`).

On disk the checkpoint uses the per-expert layout of transformers-4 checkpoints
(``model.layers.0.mlp.experts.5.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.5.w1``),
which is how transformers-4 and vLLM serialise bitsandbytes weights: each quantized
projection is stored as bitsandbytes writes it (4-bit: packed ``uint8`` ``weight`` plus
``weight.absmax``, ``weight.quant_map`` and ``weight.quant_state.bitsandbytes__nf4``; 8-bit:
``int8`` ``weight`` plus ``SCB``). Super Experts planned at 16 bit are plain tensors.

``config.json`` carries a bitsandbytes ``quantization_config`` when every quantized unit
has the same width (bitsandbytes configs have one width), with the 16-bit modules in
``llm_int8_skip_modules``, and the transformers-4 config keys. transformers 5 cannot load
it: its MoE classes have fused 3D experts that bitsandbytes does not quantize. Load it with
:func:`load_bnb` (``secompress.load`` calls it), which rebuilds the per-expert layout with
real ``Linear4bit`` / ``Linear8bitLt`` modules from the stored bytes, re-quantizing nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import SecompressError, require
from ..checkpoints import check_model, load_config
from ..layout import PROJ, PerExpertExperts, refuse_into
from ..streaming import Checkpoint, build_skeleton, disk_key, materialise_model
from .bnb import keep_canonical_layout, linear8bit_class
from .plan import PLAN_NAME, QuantPlan

log = logging.getLogger(__name__)
FORMAT = "secompress-bnb"


def _targets(plan: QuantPlan, adapter) -> dict[str, int]:
    """Module name (per-expert layout) -> bits, for every quantized projection."""
    out = {}
    for name, b in plan.bits.items():
        u = plan.units[name]
        if b is None:
            continue
        if u.expert is None:
            out[name] = b
        else:
            base = f"{adapter.block_path(u.layer)}.{adapter.experts}.per_expert.{u.expert}"
            out.update({f"{base}.{p}": b for p in PROJ})
    return out


# ---- load ----------------------------------------------------------------------------------
def _bnb_module(lin: nn.Linear, key: str, ckpt: Checkpoint, bits: int, spec: dict) -> nn.Module:
    """A Linear4bit / Linear8bitLt holding the stored bytes of ``key`` (no re-quantization)."""
    bnb = require("bitsandbytes", "bnb", "loading a bitsandbytes checkpoint")
    bias = lin.bias is not None
    if f"{key}.weight" not in ckpt:
        raise SecompressError(f"'{ckpt.path}' has no tensor '{key}.weight'")
    w = ckpt.get(f"{key}.weight")
    if bits == 4:
        stats = {k[len(key) + len(".weight."):]: ckpt.get(k) for k in ckpt.where if k.startswith(f"{key}.weight.")}
        if not stats or w.dtype != torch.uint8:
            raise SecompressError(f"'{key}' is planned at 4 bits but stored as {w.dtype} without a quant state")
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=getattr(
            torch, spec["compute_dtype"]), quant_type=spec["quant_type"], device="meta")
        q.weight = bnb.nn.Params4bit.from_prequantized(w, stats, requires_grad=False, device="cpu", module=q)
    else:
        if w.dtype != torch.int8 or f"{key}.SCB" not in ckpt:
            raise SecompressError(f"'{key}' is planned at 8 bits but stored as {w.dtype} without SCB")
        q = linear8bit_class()(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False, CB=w, SCB=ckpt.get(f"{key}.SCB"))
    if bias:
        q.bias = nn.Parameter(ckpt.get(f"{key}.bias"), requires_grad=False)
    keep_canonical_layout(q)
    return q


@torch.no_grad()
def load_bnb(path: str | Path, device: str | None = None):
    """Load a ``bitsandbytes`` export with its real bitsandbytes modules; returns (model, plan)."""
    path = Path(path)
    d = json.loads((path / PLAN_NAME).read_text())
    spec = d.get("export", {})
    if spec.get("format") != FORMAT:
        raise SecompressError(f"'{path}' is not a {FORMAT} checkpoint (export format {spec.get('format')!r})")
    plan = QuantPlan.from_json(d)
    model = build_skeleton(load_config(path))  # parameters on meta, buffers real
    adapter = check_model(model)
    keep_fused = {}
    for i in adapter.moe_layer_indices(model):
        block = adapter.block_of(adapter.layers(model)[i])
        fused = adapter.experts_of(block)
        if not any(plan.bits[n] is not None for n in plan.moe_layers().get(i, [])):
            keep_fused[i] = fused
        setattr(block, adapter.experts, PerExpertExperts(fused))
    ckpt = Checkpoint(path, raw=True)  # reads its own codes
    with ckpt.reading():
        for name, bits in _targets(plan, adapter).items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    _bnb_module(model.get_submodule(name), disk_key(adapter, name), ckpt, bits, spec))
    materialise_model(model, ckpt, adapter, getattr(torch, spec["compute_dtype"]))  # the rest, as stored
    for i, fused in keep_fused.items():  # 16-bit layers run fused, as in the model that was saved
        block = adapter.block_of(adapter.layers(model)[i])
        per = adapter.experts_of(block)
        dtype = per.per_expert[0].down_proj.weight.dtype
        for name, p in list(fused.named_parameters(recurse=False)):
            setattr(fused, name, nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))
        refuse_into(per, fused)
        setattr(block, adapter.experts, fused)
    model.config.dtype = getattr(torch, spec["compute_dtype"])
    if device is not None:
        model.to(device)
    return model.eval(), plan
