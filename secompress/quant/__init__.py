"""Super-Expert-aware mixed-precision quantization and export.

    from secompress.quant import QuantConfig, quantize_, save_quantized, load_quantized
    plan = quantize_(model, QuantConfig(bits=4, group_size=128, se_bits=None), profile=prof)
    print(plan.table())
    save_quantized(model, tokenizer, plan, "out/")

Modules: ``rtn`` (group-wise round-to-nearest, pure math), ``gptq_math`` (GPTQ, pure math) and
``gptq_layers`` (GPTQ's per-layer step), ``plan`` (rules -> one explicit
bit-width per weight, SE protection, runtime compatibility), ``allocate`` (MC-MoE-style
bit allocation for an average bit-width, ILP), ``coverage`` (calibration coverage,
all-expert calibration), ``config`` (QuantConfig), ``apply`` (the stage), ``modules`` (quantized
modules and swaps), ``fused`` (quantized experts kept fused), ``export`` (save / reload through
the export format or backend), ``backends`` (one file per method, the registry ``BACKENDS``),
``formats`` (one per-layer writer per export format, the registry ``FORMATS``), ``compressed_tensors``
+ ``ct_codes`` (the compressed-tensors machinery and its loader), ``api`` (all of these in one import), ``cli``.
"""
from __future__ import annotations

from .allocate import Allocation, allocate
from .apply import plan_quantization, quantize_
from .backends import (BACKENDS, FORMATS, Backend, ExportFormat, get_backend, register, register_format, unregister,
                       unregister_format)
from .formats import ExportSummary, LayerWriter
from .compressed_tensors import load_ct
from .formats.ct import save_ct
from .config import QuantConfig
from .export import load_quantized, save_quantized
from .modules import QuantizedExperts, QuantizedLinear, apply_plan, dequantized, quantized_bytes
from .coverage import all_expert_calibration, check_coverage, expert_tokens
from .fused import FusedQuantizedExperts
from .plan import QuantPlan, Rule, quantizable_units, resolve_plan
from .rtn import QTensor, dequantize, quantize

__all__ = ["Allocation", "BACKENDS", "Backend", "ExportFormat", "ExportSummary", "FORMATS", "FusedQuantizedExperts",
           "LayerWriter", "get_backend", "load_ct", "register", "register_format", "save_ct", "unregister",
           "unregister_format", "QTensor", "QuantConfig", "QuantPlan", "QuantizedExperts", "QuantizedLinear", "Rule",
           "all_expert_calibration", "allocate", "apply_plan", "check_coverage", "dequantize", "dequantized",
           "expert_tokens", "load_quantized", "plan_quantization", "quantizable_units", "quantize", "quantize_",
           "quantized_bytes", "resolve_plan", "save_quantized"]
