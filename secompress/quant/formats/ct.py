"""The ``compressed-tensors`` export format (``pack-quantized``): what vLLM, SGLang and transformers load.

The machinery (config groups, vLLM's serving rule, the library's packer, the loader) is
:mod:`secompress.quant.compressed_tensors`. This writer goes one decoder layer at a time: quantized
experts go from their stacked codes to compressed-tensors' packed ints one weight at a time, 16-bit
experts are split per expert as views, and no dequantized copy of a quantized layer is made (only a
quantized Linear outside the experts is dequantized, to drop its weight). The config comes from the
compressed model's skeleton (the same Linear modules as the quantized model).

Scales are written in the export dtype by default (``QuantConfig.scale_dtype: model``): vLLM rounds
them to the model's dtype when it loads them, so float32 scales would only make the files bigger
(10.6% at group size 32; llm-compressor writes bf16 too). ``scale_dtype: float32`` keeps the exact
float16 values secompress computed with (compressed-tensors' dequantizer then reproduces its weights
exactly). ``secompress.load`` dequantizes with the stored scales either way, as a server does.

A scheme plan (FP8, NVFP4, MXFP4, W8A8: the scheme backend's fake-quantized modules) is written,
estimated, previewed and read back by :mod:`secompress.quant.scheme_export` in the same format.

Fused-MoE runtimes serve one scheme per MoE layer, so this format protects Super Experts per layer:
``se_mode`` defaults to ``layer`` and ``se_mode: expert`` is refused before anything is loaded.
Legend: O out features, In in features, G groups.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...checkpoints import check_model, write_model_config
from ...errors import SecompressError
from ...outputs import final_path
from ...experts import expert_weights
from ...streaming import disk_key
from .. import rtn
from ..compressed_tensors import (FORMAT, SE_MODE_ERROR, _compress, build_config, compatibility, iter_qtensors,
                                  load_ct, report, vllm_rule_problems)
from ..compat import log_warnings
from ..fused import WEIGHTS, FusedQuantizedExperts
from .base import (HEADER_BYTES, ExportFormat, ExportSummary, LayerWriter, cast_floats, plan_export_format,
                   rest_tensors, write_plan)
from .dequantized import planned_matrices
from .plain import plain_bytes

log = logging.getLogger(__name__)


def scale_dtype(plan, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``weight_scale`` is written in for ``plan`` (``meta['scale_dtype']``) and export dtype ``dtype``."""
    return torch.float32 if plan.meta.get("scale_dtype", "model") == "float32" else dtype


def ct_config(skeleton, plan):
    """(QuantizationConfig, compatibility report) of ``plan`` on the compressed model's skeleton;
    raises (se_mode expert, mixed layers, a config vLLM would reject) before anything is written."""
    if plan.se_mode == "expert" and plan.super_experts and plan.meta.get("protect_super_experts", True):
        raise SecompressError(SE_MODE_ERROR)
    adapter = check_model(skeleton)
    qc = build_config(skeleton, plan, adapter)
    qd = qc.model_dump()
    problems = vllm_rule_problems(qd, plan, adapter)
    if problems:
        raise SecompressError("the compressed-tensors config breaks vLLM's rule: " + "; ".join(problems))
    return qc, compatibility(qd, plan, adapter)


def _expert_tensors(experts, module: str, adapter, weights: bool) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors of a fused experts module named ``module`` (weights and biases,
    or biases only)."""
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
def layer_tensors(model, adapter, index: int, plan, qc, symmetric: bool) -> tuple[dict, dict]:
    """(plain tensors, packed tensors) of decoder layer ``index`` (its part of ``plan``), keyed as on disk."""
    from ..modules import dequantized

    layer = adapter.layers(model)[index]
    prefix = f"{adapter.layers_path}.{index}."
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    ex_name = f"{adapter.block_path(index)}.{adapter.experts}" if experts is not None else None
    out = {}
    with dequantized(model, experts=False, layer=index):  # quantized Linear units as plain Linear (dropped below)
        for k, v in adapter.layers(model)[index].state_dict().items():
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
    return out, _compress(iter_qtensors(model, plan, adapter), qc, symmetric)  # one weight's codes at a time


class CompressedTensorsWriter(LayerWriter):
    format = FORMAT

    def __init__(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None):
        super().__init__(folder, skeleton, plan, dtype, tokenizer, source, source_size)
        self.qc, self.compat = ct_config(skeleton, plan)  # refuses before anything is written
        self.symmetric = bool(plan.meta.get("symmetric", True))
        self.scale_dtype = scale_dtype(plan, dtype)

    def rest_tensors(self, model):
        return cast_floats(rest_tensors(model, self.adapter), self.dtype)

    def layer_tensors(self, index, layer):
        plain, packed = layer_tensors(self.model, self.adapter, index, self.plan.layer(index), self.qc,
                                      self.symmetric)
        packed = {k: v.to(self.scale_dtype) if k.endswith(".weight_scale") else v for k, v in packed.items()}
        return {**cast_floats(plain, self.dtype), **packed}

    def write_config(self, summary: ExportSummary) -> None:
        from compressed_tensors.compressors import ModelCompressor

        write_model_config(self.skeleton, self.folder, self.adapter, dtype=self.dtype)
        ModelCompressor(quantization_config=self.qc).update_config(str(self.folder))  # the library's own config
        self.plan.artifacts["compatibility"] = self.compat  # what plan.compatibility() reports from now on
        write_plan(self.folder, self.plan, {
            "format": FORMAT, "dtype": str(self.dtype).removeprefix("torch."),
            "compatibility": {k: {"ok": ok, "why": why} for k, (ok, why) in self.compat.items()},
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."), "size": summary.to_json()})
        log.info("wrote %s (compressed-tensors)\n%s", final_path(self.folder), report(self.compat))
        log_warnings(self.compat, str(final_path(self.folder)))


def ct_bytes(skeleton, plan, dtype: torch.dtype) -> int:
    """Bytes of the export: the 16-bit tensors less the quantized weights, plus their packed int32 codes,
    scales (in :func:`scale_dtype`), int32-packed zero points (asymmetric), shapes and header entries."""
    el = torch.empty((), dtype=dtype, device="meta").element_size()
    sel = torch.empty((), dtype=scale_dtype(plan, dtype), device="meta").element_size()
    asym = not plan.meta.get("symmetric", True)
    total = plain_bytes(skeleton, dtype)
    for key, (O, In), b in planned_matrices(plan):
        G = In // rtn.check_args(b, plan.meta.get("group_size"), In, key)
        total += -O * In * el + O * ((In * b + 31) // 32) * 4 + O * G * sel + 16 + 2 * HEADER_BYTES
        if asym:
            total += ((O * b + 31) // 32) * G * 4 + HEADER_BYTES
    return total


class CompressedTensorsFormat(ExportFormat):
    name = FORMAT
    package, extra = "compressed_tensors", "ct"
    default_se_mode = "layer"
    writer_class = CompressedTensorsWriter
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # integer codes, experts fused; any ignore "
                    "list\n# vLLM: LLM('PATH')   SGLang: python -m sglang.launch_server --model-path PATH\n"
                    "# transformers (when the compatibility report says yes): "
                    "AutoModelForCausalLM.from_pretrained('PATH')")

    def check(self, config) -> None:
        if config.protect_super_experts and config.se_mode == "expert":
            raise ValueError(SE_MODE_ERROR)

    def writer(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None, **options):
        from ..scheme_export import SchemeWriter, plan_scheme

        if plan is not None and plan_scheme(plan) is not None:  # FP8, NVFP4, ...: the scheme backend's modules
            self.require()
            return SchemeWriter(folder, skeleton, plan, dtype, tokenizer, source, source_size, **options)
        return super().writer(folder, skeleton, plan, dtype, tokenizer, source, source_size, **options)

    def estimate_bytes(self, skeleton, plan, dtype, source=None) -> int:
        from ..scheme_export import estimate_bytes, plan_scheme

        if plan_scheme(plan) is not None:
            return estimate_bytes(skeleton, plan, dtype)
        return ct_bytes(skeleton, plan, dtype)

    def preview(self, skeleton, plan):
        """The report the written config will give (refuses what vLLM's rule rejects), before any weight."""
        from ..scheme_export import plan_scheme, scheme_ct_config

        self.require()
        if plan_scheme(plan) is not None:
            return scheme_ct_config(skeleton, plan)[1]
        return ct_config(skeleton, plan)[1]

    def detect(self, path: Path) -> bool:
        """The plan says compressed-tensors and config.json still declares it (a copy dequantized with
        compressed-tensors' own tool keeps the plan file, not this: it loads as a plain checkpoint)."""
        if plan_export_format(path) != FORMAT or not (path / "config.json").is_file():
            return False
        cfg = json.loads((path / "config.json").read_text())
        return cfg.get("quantization_config", {}).get("quant_method") == FORMAT

    def load(self, path, device=None):
        from ..plan import PLAN_NAME, QuantPlan
        from ..scheme_export import load_schemes, plan_scheme

        if plan_scheme(QuantPlan.from_json(json.loads((Path(path) / PLAN_NAME).read_text()))) is not None:
            return load_schemes(path, device=device)
        return load_ct(path, device=device)

    def compatibility(self, plan):
        """The report derived from the written config (empty before the export is written: it depends on
        the config, not only on the plan; :meth:`preview` gives it up front)."""
        return dict(plan.artifacts.get("compatibility", {}))


EXPORT = CompressedTensorsFormat()


def save_ct(model, tokenizer, plan, out: str | Path, overwrite: bool = False, **kw) -> Path:
    """Write ``model`` (quantized per ``plan``: ``quantize_`` with RTN, or GPTQ codes read back) atomically
    to ``out`` in compressed-tensors format: the format's writer over the resident model."""
    return EXPORT.save(model, tokenizer, plan, out, overwrite, **kw)
