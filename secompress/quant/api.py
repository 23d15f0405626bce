"""The quantization API in one import (the stage, its config, the modules and the export).

    plan = quantize_(model, QuantConfig(bits=4, group_size=32, se_bits=16), profile=prof)
    save_quantized(model, tokenizer, plan, "out/")       # stock transformers loads an rtn "out/"
    model, plan = load_quantized("out/")                   # the real quantized modules again

Where things live: ``config`` (QuantConfig), ``apply`` (plan_quantization, quantize_),
``modules`` (QuantizedLinear, QuantizedExperts, apply_plan, dequantized), ``export``
(save_quantized, load_quantized), ``backends`` (one file per method and per export format, the
registries), ``formats`` (one per-layer writer per export format, the registry; ``formats.ct.save_ct``,
the default export of rtn and gptq), ``compressed_tensors`` (its config, serving rule and ``load_ct``).
"""
from __future__ import annotations

from .apply import plan_quantization, quantize_
from .backends import BACKENDS, get_backend
from .formats.dequantized import CODES_DIR, CODES_NAME, codes_file, quantized_tensors
from .compressed_tensors import load_ct
from .formats.ct import save_ct
from .config import QuantConfig
from .export import load_quantized, save_quantized
from .modules import (QuantizedExperts, QuantizedLinear, apply_plan, dequantized, planned_expert_layers,
                      planned_linears, quantized_bytes)
from .plan import PLAN_NAME

__all__ = ["BACKENDS", "CODES_DIR", "CODES_NAME", "codes_file", "PLAN_NAME", "QuantConfig", "QuantizedExperts", "QuantizedLinear", "apply_plan",
           "dequantized", "get_backend", "load_ct", "load_quantized", "plan_quantization", "planned_expert_layers",
           "planned_linears", "quantize_", "quantized_bytes", "quantized_tensors", "save_ct", "save_quantized"]
