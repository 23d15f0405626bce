"""The per-layer step of an activation-quantization scheme, and the resident driver built on it.

    step = ActQuantStep(plan, adapter, get_scheme("FP8"), calib_chunks)      # any layer source
    run_pass(Streamed(src) or Resident(model), steps=[step, writer])
    report = apply_scheme(model, "FP8", calib_ids, plan=plan)                  # resident, in place

For each decoder layer ``i`` the step receives the calibration stream's hidden states as they leave the
layers quantized before it (the pipeline's propagated stream) and: collects the layer's input statistics
(:func:`~secompress.quant.actstats.collect_layer`), optionally folds smoothing in
(:func:`~secompress.quant.smoothing.smooth_layer`, statistics collected again), sets static scales by
the chosen rule (:func:`~secompress.quant.actstats.static_input_scales`) and swaps the layer's modules
for fake-quantized ones (:func:`~secompress.quant.actquant.swap_layer`); the driver then sends the
stream through the quantized layer. A writer step after it stores
:func:`~secompress.quant.ct_schemes.layer_tensors` of the same layer.
Legend: N windows, S sequence length, L decoder layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..checkpoints import check_model
from ..pipeline.driver import Stream, run_pass
from ..pipeline.sources import Resident
from ..streaming import run_layer
from .actquant import layer_assignment, swap_layer
from .actstats import MASSIVE_THRESHOLD, LayerStats, collect_layer, static_input_scales
from .scheme_export import record_fused
from .schemes import Scheme, get_scheme
from .smoothing import SmoothConfig, smooth_layer

log = logging.getLogger(__name__)
STREAM = "actquant-calibration"


@dataclass
class ApplyReport:
    stats: dict[int, LayerStats] = field(default_factory=dict)
    scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    smoothing: dict[int, dict] = field(default_factory=dict)
    assignments: dict[int, dict] = field(default_factory=dict)


class ActQuantStep:
    """Quantize each decoder layer with ``scheme`` per ``plan`` (see the module docstring). ``calib``:
    the calibration windows in chunks ([B, S] each), declared as this step's stream ``stream``; None: the
    pass already carries stream ``stream`` through the quantized layers (a backend's calibration stream)."""

    def __init__(self, plan, adapter, scheme: Scheme, calib: list[torch.Tensor] | None, se_scheme: Scheme | None = None,
                 rule: str = "max", all_experts: bool = False, serving: str = "layer",
                 smooth: SmoothConfig | None = None, massive_threshold: float = MASSIVE_THRESHOLD,
                 stream: str = STREAM, keep_stats: bool = True):
        self.plan, self.adapter, self.scheme, self.se_scheme = plan, adapter, scheme, se_scheme
        self.rule, self.all_experts, self.serving, self.smooth = rule, all_experts, serving, smooth
        self.massive_threshold, self.stream, self.keep_stats = massive_threshold, stream, keep_stats
        self.streams = {} if calib is None else {stream: Stream(list(calib))}
        self.report = ApplyReport()

    @torch.no_grad()
    def on_layer(self, index: int, layer, inputs) -> None:
        ad = self.adapter
        hidden, args = inputs.hidden[self.stream], inputs.args[self.stream]

        def run(n: int | None = None):
            return [run_layer(layer, h, *args[c]) for c, h in enumerate(hidden[:n])]

        assignment = layer_assignment(self.plan, index, ad, self.scheme, self.se_scheme)
        if self.smooth is None and not any(_needs_statistics(s) for s in assignment.values() if s is not None):
            stats = LayerStats()  # dynamic activations, per-channel / group / block weights: nothing to calibrate
        else:
            with collect_layer(layer, ad, self.massive_threshold, self.all_experts) as stats:
                run()
        if self.smooth is not None:
            quantized = {n for n, s in assignment.items() if s is not None and s.inputs is not None}
            self.report.smoothing[index] = smooth_layer(layer, ad, stats, lambda: run(1), self.smooth, quantized)
            with collect_layer(layer, ad, self.massive_threshold, self.all_experts) as stats:
                run()
        scales, dtype = {}, next(layer.parameters()).dtype
        for name, sch in assignment.items():
            if sch is not None:
                mine = static_input_scales(stats, sch, self.rule, dtype)
                scales.update({k: v for k, v in mine.items()
                               if k == name or (name == ad.experts and k.startswith("experts."))})
        swap_layer(layer, ad, assignment, scales, stats.shared, self.serving)
        record_fused(self.plan, index, stats.shared)  # what a loader needs to serve fused FP8 weights the same way
        rep = self.report
        rep.scales[index], rep.assignments[index] = scales, assignment
        if self.keep_stats:  # per-channel statistics of every expert: a benchmark's, not a product run's
            rep.stats[index] = stats
        log.info("layer %d: %s", index, ", ".join(f"{k}={v.name if v else '16-bit'}" for k, v in assignment.items()))


def _needs_statistics(scheme: Scheme) -> bool:
    """Static input scales, or weight scales shared by the Linears a server fuses (FP8 per-tensor, NVFP4's
    global scale): both come from the calibration pass (the fused groups are seen reading one tensor)."""
    w = scheme.weights
    return scheme.static_inputs or w.has_global_scale or w.strategy == "tensor"


@torch.no_grad()
def apply_scheme(model, scheme: str | Scheme, calib: torch.Tensor, plan=None, se_scheme: str | Scheme | None = None,
                 rule: str = "max", all_experts: bool = False, serving: str = "layer",
                 smooth: SmoothConfig | None = None, massive_threshold: float = MASSIVE_THRESHOLD,
                 batch_size: int = 8) -> ApplyReport:
    """Quantize ``model`` in place with ``scheme`` on calibration windows ``calib [N, S]`` (one resident
    pass of :class:`ActQuantStep`). ``plan`` (a :class:`~secompress.quant.plan.QuantPlan`) says which units
    stay 16-bit (default: every unit quantized); ``smooth``: fold SmoothQuant / EAQuant factors into each
    layer between its statistics and its scales."""
    from .plan import resolve_plan

    adapter = check_model(model)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    se_scheme = get_scheme(se_scheme) if isinstance(se_scheme, str) else se_scheme
    plan = plan or resolve_plan(model, default=scheme.weight_bits)
    step = ActQuantStep(plan, adapter, scheme, list(calib.split(batch_size)), se_scheme, rule, all_experts, serving,
                        smooth, massive_threshold)
    run_pass(Resident(model), steps=[step], progress=False, desc="activation quantization")
    return step.report
