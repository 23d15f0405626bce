"""A resident driver for activation-quantization schemes: layer by layer, on a model in memory.

    report = apply_scheme(model, "FP8", calib_ids, plan=plan)          # in place, returns the statistics

The calibration windows' inputs of decoder layer 0 are captured once; then for each layer ``i`` in order:
its statistics are collected on the inputs it receives from the already-quantized layers before it
(:func:`~secompress.quant.actstats.collect_layer`), optionally smoothing is folded in
(:func:`~secompress.quant.smoothing.smooth_layer`, statistics collected again), static scales are set by
the chosen rule, the layer's modules are swapped for fake-quantized ones
(:func:`~secompress.quant.actquant.swap_layer`) and the quantized layer's outputs become layer
``i + 1``'s inputs. A layer-by-layer engine runs the same per-layer steps on its own stream.
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
from .smoothing import SmoothConfig, smooth_layer

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    stats: dict[int, LayerStats] = field(default_factory=dict)
    scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    smoothing: dict[int, dict] = field(default_factory=dict)
    assignments: dict[int, dict] = field(default_factory=dict)


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, adapter, ids: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """(args, kwargs) decoder layer 0 receives for each chunk of ``ids [N, S]``."""
    got = []

    def catch(mod, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = adapter.layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for chunk in ids.split(batch_size):
            try:
                model(input_ids=chunk.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    return ((h,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": h})


@torch.no_grad()
def _run(layer, inputs) -> list:
    out = []
    for a, k in inputs:
        o = layer(*a, **k)
        out.append(o[0] if isinstance(o, tuple) else o)
    return out


@torch.no_grad()
def apply_scheme(model, scheme: str | Scheme, calib: torch.Tensor, plan=None, se_scheme: str | Scheme | None = None,
                 rule: str = "max", all_experts: bool = False, serving: str = "layer",
                 smooth: SmoothConfig | None = None, massive_threshold: float = MASSIVE_THRESHOLD,
                 batch_size: int = 8) -> ApplyReport:
    """Quantize ``model`` in place with ``scheme`` on calibration windows ``calib [N, S]``. ``plan``
    (a :class:`~secompress.quant.plan.QuantPlan`) says which units stay 16-bit (default: every unit
    quantized); ``smooth``: fold SmoothQuant / EAQuant factors into each layer between its statistics
    and its scales (the statistics are then collected again on the smoothed layer)."""
    from .plan import resolve_plan

    adapter = check_model(model)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    se_scheme = get_scheme(se_scheme) if isinstance(se_scheme, str) else se_scheme
    plan = plan or resolve_plan(model, default=scheme.weight_bits)
    rep = ApplyReport()
    inputs = layer_inputs(model, adapter, calib, batch_size)
    for i, layer in enumerate(adapter.layers(model)):
        assignment = layer_assignment(plan, i, adapter, scheme, se_scheme)
        with collect_layer(layer, adapter, massive_threshold, all_experts) as stats:
            _run(layer, inputs)
        if smooth is not None:
            quantized = {n for n, s in assignment.items() if s is not None and s.inputs is not None}
            rep.smoothing[i] = smooth_layer(layer, adapter, stats, lambda: _run(layer, inputs[:1]), smooth, quantized)
            with collect_layer(layer, adapter, massive_threshold, all_experts) as stats:
                _run(layer, inputs)
        scales, dtype = {}, next(layer.parameters()).dtype
        for name, sch in assignment.items():
            if sch is not None:
                mine = static_input_scales(stats, sch, rule, dtype)
                scales.update({k: v for k, v in mine.items()
                               if k == name or (name == adapter.experts and k.startswith("experts."))})
        swap_layer(layer, adapter, assignment, scales, stats.shared, serving)
        rep.stats[i], rep.scales[i], rep.assignments[i] = stats, scales, assignment
        outs = _run(layer, inputs)
        inputs = [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outs)]
        log.info("layer %d: %s", i, ", ".join(f"{k}={v.name if v else '16-bit'}" for k, v in assignment.items()))
    return rep
