"""A resident driver for activation-quantization schemes: layer by layer, on a model in memory.

    report = apply_scheme(model, "FP8", calib_ids, plan=plan)          # in place, returns the statistics

For each decoder layer ``i`` in order: the calibration windows go through the whole model (layers
before ``i`` already quantized, so layer ``i`` sees what it will see when served), the layer's input
statistics are collected (:func:`~secompress.quant.actstats.collect_layer`), optionally smoothed
(:mod:`secompress.quant.smoothing`), turned into static scales by the chosen rule and the layer's
modules are swapped for fake-quantized ones (:func:`~secompress.quant.actquant.swap_layer`). A
layer-by-layer engine calls the same three steps per layer with its own stream of hidden states.
Legend: N windows, S sequence length, L decoder layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..checkpoints import check_model
from .actquant import layer_assignment, swap_layer
from .actstats import MASSIVE_THRESHOLD, LayerStats, collect_layer, static_input_scales
from .schemes import Scheme, get_scheme

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    stats: dict[int, LayerStats] = field(default_factory=dict)
    scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    smoothing: dict[int, dict] = field(default_factory=dict)


@torch.no_grad()
def _forward(model, ids: torch.Tensor, batch_size: int) -> None:
    dev = next(model.parameters()).device
    for chunk in ids.split(batch_size):
        model(input_ids=chunk.to(dev), use_cache=False)


@torch.no_grad()
def apply_scheme(model, scheme: str | Scheme, calib: torch.Tensor, plan=None, se_scheme: str | Scheme | None = None,
                 rule: str = "max", all_experts: bool = False, serving: str = "layer", smooth=None,
                 massive_threshold: float = MASSIVE_THRESHOLD, batch_size: int = 8) -> ApplyReport:
    """Quantize ``model`` in place with ``scheme`` on calibration windows ``calib [N, S]``. ``plan``
    (a :class:`~secompress.quant.plan.QuantPlan`) says which units stay 16-bit (default: every unit
    quantized); ``smooth(layer, index, stats) -> dict`` runs between statistics and scales (then the
    statistics are collected again on the smoothed layer)."""
    from .plan import resolve_plan

    adapter = check_model(model)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    se_scheme = get_scheme(se_scheme) if isinstance(se_scheme, str) else se_scheme
    plan = plan or resolve_plan(model, default=scheme.weight_bits if scheme.weight_bits in (2, 3, 4, 8) else 8)
    rep = ApplyReport()
    for i, layer in enumerate(adapter.layers(model)):
        assignment = layer_assignment(plan, i, adapter, scheme, se_scheme)
        with collect_layer(layer, adapter, massive_threshold, all_experts) as stats:
            _forward(model, calib, batch_size)
        if smooth is not None:
            rep.smoothing[i] = smooth(layer, i, stats, assignment)
            with collect_layer(layer, adapter, massive_threshold, all_experts) as stats:
                _forward(model, calib, batch_size)
        scales, dtype = {}, next(layer.parameters()).dtype
        for name, sch in assignment.items():
            if sch is not None:
                mine = static_input_scales(stats, sch, rule, dtype)
                scales.update({k: v for k, v in mine.items()
                               if k == name or (name == adapter.experts and k.startswith("experts."))})
        swap_layer(layer, adapter, assignment, scales, stats.shared, serving)
        rep.stats[i], rep.scales[i] = stats, scales
        log.info("layer %d: %s", i, ", ".join(f"{k}={v.name if v else '16-bit'}" for k, v in assignment.items()))
    return rep
