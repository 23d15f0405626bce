"""Super-Expert-aware mixed-precision quantization and export.

    from secompress.quant import QuantConfig, quantize_, save_quantized, load_quantized
    plan = quantize_(model, QuantConfig(bits=4, group_size=128, se_bits=None), profile=prof)
    print(plan.table())
    save_quantized(model, tokenizer, plan, "out/")

Modules: ``rtn`` (group-wise round-to-nearest, pure math), ``plan`` (rules -> one explicit
bit-width per weight, SE protection, runtime compatibility), ``allocate`` (MC-MoE-style
bit allocation for an average bit-width, ILP), ``coverage`` (calibration coverage,
all-expert calibration), ``fused`` (quantized experts kept fused), ``api`` (the stage, export,
reload), ``compressed_tensors`` + ``ct_codes`` (the compressed-tensors export and its loader), ``cli``.
"""
from __future__ import annotations

from .allocate import Allocation, allocate
from .api import (QuantConfig, QuantizedExperts, QuantizedLinear, apply_plan, dequantized, load_quantized,
                  plan_quantization, quantize_, quantized_bytes, save_quantized)
from .compressed_tensors import load_ct, save_ct
from .coverage import all_expert_calibration, check_coverage, expert_tokens
from .fused import FusedQuantizedExperts
from .plan import QuantPlan, Rule, quantizable_units, resolve_plan
from .rtn import QTensor, dequantize, quantize

__all__ = ["Allocation", "FusedQuantizedExperts", "QTensor", "QuantConfig", "QuantPlan", "QuantizedExperts", "QuantizedLinear", "Rule",
           "all_expert_calibration", "allocate", "apply_plan", "check_coverage", "dequantize", "dequantized",
           "expert_tokens", "load_ct", "load_quantized", "plan_quantization", "quantizable_units", "quantize", "quantize_",
           "quantized_bytes", "resolve_plan", "save_ct", "save_quantized"]
