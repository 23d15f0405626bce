"""The compressed-tensors export of a scheme plan (FP8, NVFP4, ...), one layer at a time, and reading it back.

    qc, compat = scheme_ct_config(skeleton, plan)       # before any weight is read (refusals, the report)
    n = estimate_bytes(skeleton, plan, dtype)          # the export's size, from shapes only
    w = SchemeWriter(folder, skeleton, plan, dtype)    # the compressed-tensors format's writer for a scheme plan
    model, plan = load_schemes("out/")                 # fake-quantized modules from the stored codes

The ``compressed-tensors`` export format (:mod:`secompress.quant.formats.ct`) hands a scheme plan to
this module: a plan is one when ``plan.meta["scheme"]`` names a preset whose weights are not integer
weight-only (:func:`plan_scheme`); the integer ones (W4A16, W8A16) are rtn / gptq codes that format
writes itself. Each decoder layer is written by :func:`~secompress.quant.ct_schemes.quantized_tensors`
(the library's own compressors; bit-identical to llm-compressor 0.14) and
:func:`~secompress.quant.ct_schemes.plain_tensors`, the config by
:func:`~secompress.quant.ct_schemes.scheme_config` (one group per scheme, the Super-Expert layers'
FP8_DYNAMIC group or their ``ignore`` entry), the runtimes report by :mod:`secompress.quant.scheme_compat`.
Reading back swaps :class:`~secompress.quant.actquant.FakeQuantLinear` /
:class:`~secompress.quant.actquant.FakeQuantExperts` into a meta skeleton from the stored tensors
(nothing re-quantized), then fills every other tensor.
Legend: E experts, O out features, In in features, I expert FFN width, H hidden size.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import check_model, load_config, write_model_config
from ..errors import SecompressError, require
from ..streaming import Checkpoint, _materialise, build_skeleton, materialise_rest
from .actquant import FakeQuantExperts, FakeQuantLinear, layer_assignment
from .ct_schemes import plain_tensors, quantized_tensors, read_layer, scheme_config
from .formats.base import HEADER_BYTES, ExportSummary, LayerWriter, cast_floats, write_plan
from .plan import PLAN_NAME, QuantPlan
from .schemes import Scheme, get_scheme, se_scheme_for

log = logging.getLogger(__name__)
FUSED = "fused_groups"  # plan.meta key: per layer, the Linear groups a server fuses (q/k/v, gate/up)


def plan_scheme(plan: QuantPlan) -> Scheme | None:
    """The scheme a plan quantizes with when the scheme backend makes it (None: integer codes, no scheme)."""
    name = plan.meta.get("scheme")
    if name is None:
        return None
    s = get_scheme(name)
    return None if s.weight_only_int else s


def plan_assignments(model, plan: QuantPlan, adapter=None) -> dict[int, dict[str, Scheme | None]]:
    """Decoder layer -> its modules' schemes (:func:`~secompress.quant.actquant.layer_assignment`)."""
    adapter = adapter or check_model(model)
    s = plan_scheme(plan)
    se = se_scheme_for(s, plan.se_bits)
    return {i: layer_assignment(plan, i, adapter, s, se) for i in sorted({u.layer for u in plan.units.values()})}


def _sizes(plan: QuantPlan, adapter) -> dict[int, dict[str, int]]:
    """Parameters per assignment key (a Linear's name inside its layer, or the experts), from the plan."""
    out: dict[int, dict[str, int]] = {}
    for u in plan.units.values():
        key = adapter.experts if u.expert is not None else u.name[len(f"{adapter.layers_path}.{u.layer}."):]
        out.setdefault(u.layer, {})
        out[u.layer][key] = out[u.layer].get(key, 0) + u.params
    return out


def scheme_ct_config(model, plan: QuantPlan):
    """(QuantizationConfig, compatibility report) of a scheme plan on ``model`` (a meta skeleton or the
    quantized model: the same config); raises before anything is written."""
    require("compressed_tensors", "ct", "the compressed-tensors export")
    from .scheme_compat import compatibility

    adapter = check_model(model)
    asg = plan_assignments(model, plan, adapter)
    qc = scheme_config(model, asg, adapter, _sizes(plan, adapter))
    return qc, compatibility(json.loads(qc.model_dump_json()), asg, adapter)


# ---- size -----------------------------------------------------------------------------------------------
def weight_bytes(shape: tuple[int, int], s: Scheme, el: int) -> int:
    """Bytes one quantized [O, In] weight takes on disk: codes, weight scales (``el``: bytes of the model's
    dtype, the scales' dtype unless the scheme stores FP8 / E8M0 scales), global and static input scales,
    the added tensors' header entries."""
    O, In = shape
    a = s.weights
    sel = 1 if a.scale_dtype is not None else el
    if a.strategy == "tensor":
        scales = el
    elif a.strategy == "channel":
        scales = O * el
    elif a.block:
        scales = math.ceil(O / a.block[0]) * math.ceil(In / a.block[1]) * el
    else:
        scales = O * (In // a.group_size) * sel
    extra = HEADER_BYTES  # weight_scale's header entry (the codes replace the weight's)
    if a.has_global_scale:
        extra += 4 + HEADER_BYTES
    if s.static_inputs:
        extra += (4 if s.inputs.has_global_scale else el) + HEADER_BYTES
    if s.format == "pack-quantized":
        extra += 16 + HEADER_BYTES  # weight_shape, int64 [2]
    return O * In * a.num_bits // 8 + scales + extra


def estimate_bytes(skeleton, plan: QuantPlan, dtype: torch.dtype) -> int:
    """The export's size from shapes only: every tensor of ``skeleton`` in ``dtype`` less each quantized
    weight's dense bytes plus its :func:`weight_bytes`."""
    from .formats.plain import plain_bytes

    el = torch.empty((), dtype=dtype, device="meta").element_size()
    s = plan_scheme(plan)
    se = se_scheme_for(s, plan.se_bits)
    total = plain_bytes(skeleton, dtype)
    for name, u in plan.units.items():
        if plan.bits[name] is None:
            continue
        sch = se if plan.source[name] == "se" else s
        if u.expert is None:
            mats = [(u.params // u.in_features[0], u.in_features[0])]
        else:
            H, I = u.in_features
            mats = [(I, H), (I, H), (H, I)]
        total += sum(weight_bytes(m, sch, el) - m[0] * m[1] * el for m in mats)
    return total


# ---- write ----------------------------------------------------------------------------------------------
def record_fused(plan: QuantPlan, index: int, shared) -> None:
    """Keep layer ``index``'s fused Linear groups in the plan (a loader requantizes FP8 per-tensor weights
    of a group to its largest scale, as vLLM does; the groups are seen only in the calibration pass)."""
    if shared:
        plan.meta.setdefault(FUSED, {})[str(index)] = [list(g) for g in shared]


class SchemeWriter(LayerWriter):
    """The compressed-tensors export of a scheme plan, layer by layer (in memory or streamed): each layer's
    fake-quantized modules as the compressor stores them, its other tensors in the export dtype."""

    format = "compressed-tensors"

    def __init__(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None):
        super().__init__(folder, skeleton, plan, dtype, tokenizer, source, source_size)
        self.qc, self.compat = scheme_ct_config(skeleton, plan)  # refuses before anything is written
        self.assignments = plan_assignments(skeleton, plan, self.adapter)

    def rest_tensors(self, model):
        from .formats.base import rest_tensors

        return cast_floats(rest_tensors(model, self.adapter), self.dtype)

    @torch.no_grad()
    def layer_tensors(self, index, layer):
        for name, s in self.assignments.get(index, {}).items():
            if s is not None and not isinstance(_module(layer, self.adapter, name), (FakeQuantLinear, FakeQuantExperts)):
                raise SecompressError(f"layer {index} is planned with scheme {self.plan.meta['scheme']} but its "
                                      f"'{name}' is not quantized: write the model the scheme backend quantized")
        return {**cast_floats(plain_tensors(layer, index, self.adapter), self.dtype),
                **quantized_tensors(layer, index, self.adapter)}

    def write_config(self, summary: ExportSummary) -> None:
        from compressed_tensors.compressors import ModelCompressor

        from .compressed_tensors import report

        write_model_config(self.skeleton, self.folder, self.adapter, dtype=self.dtype)
        ModelCompressor(quantization_config=self.qc).update_config(str(self.folder))
        self.plan.artifacts["compatibility"] = self.compat
        write_plan(self.folder, self.plan, {
            "format": self.format, "dtype": str(self.dtype).removeprefix("torch."),
            "compatibility": {k: {"ok": ok, "why": why} for k, (ok, why) in self.compat.items()},
            "size": summary.to_json()})
        log.info("wrote %s (compressed-tensors, scheme %s)\n%s", self.folder, self.plan.meta["scheme"],
                 report(self.compat))


def _module(layer, adapter, name: str) -> nn.Module:
    return adapter.experts_of(adapter.block_of(layer)) if name == adapter.experts else layer.get_submodule(name)


# ---- read ------------------------------------------------------------------------------------------------
@contextmanager
def _hidden(layer: nn.Module):
    """The fake-quantized modules of ``layer`` out of sight (their tensors are loaded already): a generic
    materialiser would read their stored codes and scales as plain tensors."""
    swaps = []
    for name, m in list(layer.named_modules()):
        if isinstance(m, (FakeQuantLinear, FakeQuantExperts)):
            parent, _, attr = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            swaps.append((owner, attr, m))
            setattr(owner, attr, nn.Module())
    try:
        yield
    finally:
        for owner, attr, m in swaps:
            setattr(owner, attr, m)


def _expert_biases(experts, tensors: dict[str, torch.Tensor], adapter, index: int) -> None:
    """A biased experts module (GPT-OSS) on meta gets its [E, 2I] / [E, H] biases from the per-expert ones."""
    from ..experts import join_gate_up, layout_of
    from .compressed_tensors import _expert_disk

    lay = layout_of(experts)
    if not lay.has_bias:
        return
    b = {p: torch.stack([tensors[f"{_expert_disk(adapter, index, e, p)}.bias"] for e in range(experts.num_experts)])
         for p in ("gate_proj", "up_proj", "down_proj")}
    gu = torch.stack([join_gate_up(b["gate_proj"][e], b["up_proj"][e], lay.concatenated)
                      for e in range(experts.num_experts)])
    experts.gate_up_proj_bias = nn.Parameter(gu, requires_grad=False)
    experts.down_proj_bias = nn.Parameter(b["down_proj"], requires_grad=False)


@torch.no_grad()
def load_schemes(path: str | Path, device: str | None = None):
    """Load a scheme export with fake-quantized modules (weights from the stored codes, inputs quantized
    as the server does); returns (model, plan)."""
    require("compressed_tensors", "ct", "loading a compressed-tensors checkpoint")
    path = Path(path)
    d = json.loads((path / PLAN_NAME).read_text())
    plan = QuantPlan.from_json(d)
    if plan_scheme(plan) is None:
        raise SecompressError(f"'{path}' holds no scheme export (plan meta scheme {plan.meta.get('scheme')!r})")
    dtype = getattr(torch, d["export"]["dtype"])
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plain model; the quantized modules are swapped in
    model = build_skeleton(config)
    adapter = check_model(model)
    asg = plan_assignments(model, plan, adapter)
    serving = plan.meta.get("options", {}).get("serving", "layer")
    fused = plan.meta.get(FUSED, {})
    ckpt = Checkpoint(path, raw=True)
    with ckpt.reading():
        for i, layer in enumerate(adapter.layers(model)):
            prefix = f"{adapter.layers_path}.{i}."
            tensors = {k: ckpt.get(k) for k in ckpt.where if k.startswith(prefix)}
            if asg.get(i, {}).get(adapter.experts) is not None:
                _expert_biases(adapter.experts_of(adapter.block_of(layer)), tensors, adapter, i)
            read_layer(layer, i, adapter, asg.get(i, {}), tensors, [tuple(g) for g in fused.get(str(i), [])], serving)
            with _hidden(layer):
                _materialise(layer, prefix, ckpt, adapter, dtype)
            del tensors
        materialise_rest(model, ckpt, adapter, dtype)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SecompressError(f"'{path}' has no tensor for '{missing[0]}'")
    for m in model.modules():  # the skeleton was built in float32; compute in the stored dtype
        if isinstance(m, (FakeQuantLinear, FakeQuantExperts)):
            m.weight_dtype = dtype
    model.config.dtype = dtype
    if device is not None:
        model.to(device)
    return model.eval(), plan
