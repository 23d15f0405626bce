"""bitsandbytes in the layer-by-layer engine: each layer quantized and written as it comes.

    plan = plan_streamed("ckpt/", StreamedJob(quant=QuantConfig(method="bnb", bits=4, group_size=None)), profile)
    res = compress_streamed(plan, eval_ids, out="out/model", tokenizer=tok)

Per decoder layer, :class:`QuantizeLayersBnb` swaps the layer's planned units for real
``Linear4bit`` / ``Linear8bitLt`` modules exactly as the in-memory backend does
(:func:`~secompress.quant.bnb.apply_bnb` on the layer's part of the plan), the evaluation windows
run through it, and :class:`ExportLayersBnb` writes its tensors through
:class:`~secompress.shards.PartWriter` with the names and bytes
:func:`~secompress.quant.bnb_export.save_bnb` stores (per-expert layout, bitsandbytes' own quant
states, 16-bit fused experts split per expert). :func:`finish_bnb` writes the config
(bitsandbytes ``quantization_config``, ``llm_int8_skip_modules`` worked out on the meta skeleton)
and the plan. bitsandbytes' CPU quantization is deterministic, so the export is bit-identical to
the in-memory one (tested on three architectures).
Legend: P a weight's parameters, O its out features.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ..checkpoints import check_model
from ..layout import PerExpertExperts
from .plan import QuantPlan

log = logging.getLogger(__name__)
BLOCK = 64  # bitsandbytes' 4-bit block size (one float32 absmax per block, no double quantization)
QUANT_STATE_BYTES = 16 * 4 + 80  # the 16-entry float32 quant_map and the JSON quant state, per 4-bit weight
HEADER_BYTES = 112  # about what one tensor's entry adds to a safetensors header


def bnb_bytes(skeleton, plan: QuantPlan, dtype: torch.dtype) -> int:
    """Estimated size of the export: the model's tensors in ``dtype``, each quantized weight replaced
    by its bitsandbytes storage (4-bit: P/2 bytes, a float32 absmax per block and its quant state;
    8-bit: P bytes and the float32 row scales), and the headers (fused experts stored per expert)."""
    from ..experts import expert_weights
    from ..layout import PROJ

    adapter = check_model(skeleton)
    el = torch.empty((), dtype=dtype, device="meta").element_size()
    total = sum(p.numel() for p in skeleton.parameters()) * el
    tensors = len(dict(skeleton.named_parameters()))
    for i in adapter.moe_layer_indices(skeleton):
        ex = adapter.experts_of(adapter.block_of(adapter.layers(skeleton)[i]))
        tensors += ex.num_experts * len(expert_weights(ex, 0)) - len(dict(ex.named_parameters()))
    for name, b in plan.bits.items():
        if b is None:
            continue
        u = plan.units[name]
        mats = [u.in_features[0]] if u.expert is None else [u.in_features[p == "down_proj"] for p in PROJ]
        per = u.params // len(mats)  # the projections of an expert have the same size
        for n_in in mats:
            total -= per * el
            if b == 4:
                total += per // 2 + (per + BLOCK - 1) // BLOCK * 4 + QUANT_STATE_BYTES
                tensors += 3
            else:
                total += per + per // n_in * 4
                tensors += 1
    return total + tensors * HEADER_BYTES


class QuantizeLayersBnb:
    """Replace the layer's planned units by bitsandbytes modules (as the in-memory ``bnb`` backend)."""

    def __init__(self, eng, plan: QuantPlan, quant_type: str):
        self.eng, self.plan, self.quant_type = eng, plan, quant_type

    def on_layer(self, index: int, layer, inputs) -> None:
        from .bnb import apply_bnb

        sub = self.plan.layer(index)
        if any(b is not None for b in sub.bits.values()):
            apply_bnb(self.eng.model, sub, self.quant_type)


class ExportLayersBnb:
    """Write each layer's bitsandbytes export tensors as it finishes (one part file per layer)."""

    def __init__(self, eng, folder: Path, plan: QuantPlan):
        from ..shards import PartWriter

        self.eng, self.plan, self.writer = eng, plan, PartWriter(folder)

    def write_rest(self) -> None:
        from .bnb_export import rest_tensors

        self.writer.write_part(rest_tensors(self.eng.model, self.eng.adapter))

    def on_layer(self, index: int, layer, inputs) -> None:
        from .bnb_export import layer_tensors

        self.writer.write_part(layer_tensors(self.eng.model, self.eng.adapter, index))


def _spec(plan: QuantPlan, adapter, quant_type: str, dtype: torch.dtype) -> dict:
    """The export spec :func:`~secompress.quant.bnb_export.save_bnb` derives from the quantized modules."""
    from .bnb_export import FORMAT, _targets

    bits = sorted(set(_targets(plan, adapter).values()))
    return {"format": FORMAT, "quant_type": quant_type if 4 in bits else "nf4", "compute_dtype": str(dtype)[6:],
            "bits": bits}


def _quantized_shape(skeleton, plan: QuantPlan, adapter):
    """A meta copy of the skeleton with the module tree the bnb backend leaves: the experts of every
    layer with a planned expert in the per-expert layout (which Linear modules stay 16-bit)."""
    from .modules import planned_expert_layers

    model = copy.deepcopy(skeleton)
    for block, experts, _ in list(planned_expert_layers(model, plan, adapter)):
        setattr(block, adapter.experts, PerExpertExperts(experts))
    return model


def finish_bnb(folder: Path, skeleton, plan: QuantPlan, job, tokenizer=None) -> None:
    """config.json (with the bitsandbytes quantization_config), generation config, tokenizer and plan,
    as :func:`~secompress.quant.bnb_export.save_bnb` writes them for the same model."""
    from .bnb_export import quantization_config, write_side_files

    adapter = check_model(skeleton)
    spec = _spec(plan, adapter, job.quant.options.quant_type, job.dtype)
    model = _quantized_shape(skeleton, plan, adapter)  # a copy: its config says the compute dtype, as the caller set it
    qcfg = quantization_config(model, plan, adapter, spec)
    write_side_files(folder, model, adapter, plan, spec, qcfg, tokenizer)
    log.info("wrote %s (bitsandbytes, streamed; bits %s)", folder, spec["bits"])
