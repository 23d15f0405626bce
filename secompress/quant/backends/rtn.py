"""The ``rtn`` backend: group-wise round-to-nearest (:mod:`secompress.quant.rtn`), no dependency.

``apply`` leaves integer-coded modules in the model (``QuantizedLinear``, fused
``QuantizedExperts``); they are written in an export format of the registry
(``compressed-tensors`` by default, or ``dequantized``: :mod:`secompress.quant.formats`).
"""
from __future__ import annotations

from .. import rtn
from ..modules import apply_plan
from ..plan import QuantPlan
from .base import Backend, check_group_sizes


class RtnBackend(Backend):
    name = "rtn"
    holds_codes = True
    default_format = "compressed-tensors"

    def for_scheme(self, scheme):
        """Integer weight-only schemes (W4A16, W8A16) are this backend's own codes; every other scheme
        (FP8, NVFP4, MXFP4, W8A8: round-to-nearest on its grid, with activation scales) is the scheme
        backend's (:mod:`.scheme`)."""
        if scheme.weight_only_int:
            return self
        from .scheme import BACKEND as SCHEME

        return SCHEME

    def check_plan(self, plan, config) -> None:
        check_group_sizes(plan, config.group_size)

    def layer_step(self, src, plan, config) -> "RtnLayers":
        return RtnLayers(src, plan, config.group_size, config.symmetric)


class RtnLayers:
    """Each layer's part of the plan RTN-quantized in place, on the device the layer lives on."""

    def __init__(self, src, plan: QuantPlan, group_size: int | None, symmetric: bool):
        self.src, self.plan = src, plan
        self.make = lambda key, w, bits: rtn.quantize(w, bits, group_size, symmetric)

    def on_layer(self, index: int, layer, inputs) -> None:
        sub = self.plan.layer(index)
        if any(b is not None for b in sub.bits.values()):
            apply_plan(self.src.model, sub, self.make)


BACKEND = RtnBackend()
