"""The ``gptq`` backend: GPTQ (Frantar et al. 2023, arXiv 2210.17323) in this process, layer by layer.

``layer_step`` is :class:`~secompress.quant.gptq_layers.GptqLayers`, run by the one loop
(:mod:`secompress.pipeline`) over a model in memory (``apply``, ``quantize_``) or the checkpoint's
shards (``--streaming``) with the calibration stream ``CALIB_Q``; calibration coverage is checked when
the plan is made (:func:`~secompress.quant.apply.plan_quantization`). The math is :mod:`secompress.quant.gptq_math`; the
result is secompress's integer-coded modules (like RTN's), written in any export format
(``compressed-tensors`` by default, or ``dequantized``). No dependency: gptqmodel is only a
cross-check in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Backend, check_group_sizes


@dataclass(frozen=True)
class GptqOptions:
    batch_size: int = 4  # calibration windows per forward
    damp: float = 0.01  # percdamp: H += damp * mean(diag H) * I (the paper's code, llm-compressor)
    block_size: int = 128  # columns per lazy batch update
    static_groups: bool = False  # every group's grid from the original weights (else when the group starts)
    act_order: bool = False  # desc_act: refused (its permutation does not fit contiguous groups)

    def __post_init__(self):
        for k in ("batch_size", "block_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ValueError(f"damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.static_groups, bool) or not isinstance(self.act_order, bool):
            raise ValueError("static_groups and act_order must be true or false")
        if self.act_order:
            raise ValueError("act_order (desc_act) is not supported: its column permutation cannot be stored as the "
                             "contiguous groups of secompress's codes and the compressed-tensors export")


class GptqBackend(Backend):
    name = "gptq"
    options = GptqOptions
    calibrated = True
    propagated_calibration = True  # its step reads the calibration stream through the layers quantized before
    holds_codes = True  # integer-coded modules: any export format writes them
    default_format = "compressed-tensors"

    def for_scheme(self, scheme):
        if not scheme.weight_only_int:
            raise ValueError(f"scheme {scheme.name} with method gptq: gptqmodel makes integer weight-only codes "
                             "(W4A16, W8A16); use method rtn for this scheme")
        return self

    def check_plan(self, plan, config) -> None:
        check_group_sizes(plan, config.group_size)

    def layer_step(self, src, plan, config):
        """The per-layer step on any layer source (``src.model``); it reads the stream ``CALIB``."""
        from ..gptq_layers import GptqLayers

        return GptqLayers(src, plan, config)


BACKEND = GptqBackend()
