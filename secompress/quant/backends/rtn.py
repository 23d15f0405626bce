"""The ``rtn`` backend: group-wise round-to-nearest (:mod:`secompress.quant.rtn`), no dependency.

``apply`` leaves integer-coded modules in the model (``QuantizedLinear``, fused
``QuantizedExperts``); they are written in an export format of the registry
(``compressed-tensors`` by default, or ``dequantized``: :mod:`secompress.quant.formats`).
"""
from __future__ import annotations

from .. import rtn
from ..modules import apply_plan
from ..plan import QuantPlan
from .base import Backend, QuantContext, check_group_sizes


class RtnBackend(Backend):
    name = "rtn"
    holds_codes = True
    default_format = "compressed-tensors"

    def check_plan(self, plan, config) -> None:
        check_group_sizes(plan, config.group_size)

    def apply(self, model, plan, config, ctx: QuantContext) -> QuantPlan:
        gs, sym = config.group_size, config.symmetric
        apply_plan(model, plan, lambda key, w, bits: rtn.quantize(w, bits, gs, sym))
        return plan


BACKEND = RtnBackend()
