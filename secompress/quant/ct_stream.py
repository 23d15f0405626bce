"""The compressed-tensors export written layer by layer (the streamed engine's export callback).

    qc, compat = ct_config(skeleton, plan)                       # before any weight is read
    writer = PartWriter(folder)
    writer.write_part(rest_tensors(model, adapter))              # embeddings, final norm, head
    writer.write_part(layer_tensors(model, adapter, i, plan.layer(i), qc, symmetric))  # per layer
    writer.close(); finish_ct(folder, qc, plan, compat, dtype, tokenizer)

Same files, names and bytes as :func:`~secompress.quant.compressed_tensors.save_ct` writes for
the same model (tested on every architecture), but one decoder layer's tensors at a time:
quantized experts go from their stacked codes to compressed-tensors' packed ints one expert at a
time, 16-bit experts are split per expert as views, and no dequantized copy of a quantized layer
is made (only a quantized Linear outside the experts is dequantized, to drop its weight like
save_ct does). The config comes from the compressed model's meta skeleton, which has the same
Linear modules as the quantized model.
Legend: E experts, O out features, In in features, G groups.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..checkpoints import check_model
from ..experts import expert_weights
from ..streaming import disk_key
from .compressed_tensors import (FORMAT, SE_MODE_ERROR, _compress, build_config, compatibility, iter_qtensors, report,
                                 vllm_rule_problems)
from .fused import WEIGHTS, FusedQuantizedExperts
from .plan import PLAN_NAME, QuantPlan

log = logging.getLogger(__name__)


def ct_config(skeleton, plan: QuantPlan):
    """(QuantizationConfig, compatibility report) of ``plan`` on the compressed model's skeleton;
    raises (se_mode expert, mixed layers, a config vLLM would reject) before anything is written."""
    from ..errors import SecompressError
    from .scheme_export import plan_scheme, scheme_ct_config

    if plan.se_mode == "expert" and plan.super_experts and plan.meta.get("protect_super_experts", True):
        raise SecompressError(SE_MODE_ERROR)
    if plan_scheme(plan) is not None:  # FP8, NVFP4, ...: the scheme backend's layout
        return scheme_ct_config(skeleton, plan)
    adapter = check_model(skeleton)
    qc = build_config(skeleton, plan, adapter)
    qd = qc.model_dump()
    problems = vllm_rule_problems(qd, plan, adapter)
    if problems:
        raise SecompressError("the compressed-tensors config breaks vLLM's rule: " + "; ".join(problems))
    return qc, compatibility(qd, plan, adapter)


def _expert_tensors(experts, module: str, adapter, weights: bool) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors of a fused experts module named ``module`` (weights and biases,
    or biases only), as save_ct's per-expert split names them."""
    out = {}
    for e in range(experts.num_experts):
        for name, t in expert_weights(experts, e).items():  # gate_proj, ..., down_proj_bias
            bias = name.endswith("_bias")
            if bias or weights:
                key = f"{module}.per_expert.{e}.{name.removesuffix('_bias')}.{'bias' if bias else 'weight'}"
                out[disk_key(adapter, key)] = t.detach().to("cpu").contiguous()
    return out


def _quantized_expert_biases(qe: FusedQuantizedExperts, module: str, adapter) -> dict[str, torch.Tensor]:
    """The per-expert biases of a quantized fused module (its weights are written as packed codes)."""
    if not qe.has_bias:
        return {}
    shell = qe.shell
    try:
        for w in WEIGHTS:  # the shell's weights stay on meta; only its biases are set, briefly
            setattr(shell, f"{w}_bias", getattr(qe, f"{w}_bias"))
        return _expert_tensors(shell, module, adapter, weights=False)
    finally:
        qe.release_fused()


@torch.no_grad()
def layer_tensors(model, adapter, index: int, plan: QuantPlan, qc, symmetric: bool) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of decoder layer ``index`` (its part of ``plan``), keyed as on disk."""
    from .modules import dequantized
    from .scheme_export import plan_scheme, scheme_layer_tensors

    if plan_scheme(plan) is not None:  # the layer holds the scheme backend's fake-quantized modules
        return scheme_layer_tensors(model, adapter, index)

    layer = adapter.layers(model)[index]
    prefix = f"{adapter.layers_path}.{index}."
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    ex_name = f"{adapter.block_path(index)}.{adapter.experts}" if experts is not None else None
    out = {}
    with dequantized(model, experts=False):  # quantized Linear units as plain Linear (weights dropped below)
        for k, v in layer.state_dict().items():
            full = prefix + k
            if ex_name is not None and full.startswith(ex_name + "."):
                continue
            out[disk_key(adapter, full)] = v.detach().to("cpu").contiguous()
    if isinstance(experts, FusedQuantizedExperts):
        out.update(_quantized_expert_biases(experts, ex_name, adapter))
    elif experts is not None:
        out.update(_expert_tensors(experts, ex_name, adapter, weights=True))
    for n, b in plan.bits.items():  # a quantized Linear's 16-bit weight (experts' weights were never added)
        if b is not None and plan.units[n].expert is None:
            out.pop(f"{disk_key(adapter, n)}.weight", None)
    out.update(_compress(iter_qtensors(model, plan, adapter), qc, symmetric))  # one weight's codes at a time
    return out


@torch.no_grad()
def rest_tensors(model, adapter) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (embeddings, final norm, output head), a tied head once."""
    head = adapter.layers_path + "."
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(head) or v.device.type == "meta":
            continue
        if v.is_floating_point() and v.numel() and (v.data_ptr(), v.shape) in seen:
            continue  # tied to a tensor already stored (tie_weights restores it on load)
        seen.add((v.data_ptr(), v.shape))
        out[disk_key(adapter, k)] = v.detach().to("cpu").contiguous()
    return out


def finish_ct(folder: Path, skeleton, qc, plan: QuantPlan, compat: dict, dtype: torch.dtype, tokenizer=None) -> None:
    """config.json (with compressed-tensors' own quantization_config), the tokenizer and the plan."""
    from compressed_tensors.compressors import ModelCompressor

    from ..checkpoints import write_model_config

    write_model_config(skeleton, folder)
    ModelCompressor(quantization_config=qc).update_config(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    plan.artifacts["compatibility"] = compat
    d = plan.to_json()
    d["export"] = {"format": FORMAT, "dtype": str(dtype).removeprefix("torch."),
                   "compatibility": {k: {"ok": ok, "why": why} for k, (ok, why) in compat.items()}}
    (folder / PLAN_NAME).write_text(json.dumps(d, indent=2) + "\n")
    log.info("wrote %s (compressed-tensors, streamed)\n%s", folder, report(compat))
