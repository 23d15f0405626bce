"""HEAPr (2025, "Hessian-based Efficient Atomic Expert Pruning in Output Space"): every routed expert
keeps its ``width`` best intermediate neurons by the output-space score (math in
:mod:`secompress.prune.heapr`, per-layer decision in :mod:`secompress.prune.neurons`).

The kept width is known up front. Scores come from the calibration windows entering each layer in
the original model: with ``hessian: identity`` in the pass itself; with ``hessian: fisher`` the
gradients dL/dy of the next-token loss first, by layer-wise gradient checkpointing over a fresh
source of the same checkpoint (:func:`fisher_stats`: a forward pass keeping each layer's inputs,
the model's head and loss on the final hidden states, then layers L-1..l0 recomputed with gradients
on, one at a time). With protection a Super Expert keeps the neurons that write its massive channel
on its massive token.
Legend: L decoder layers, l0 first MoE layer, B windows in a chunk, S sequence length, H hidden size,
E experts, I width before, I' after, T tokens.
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from ...checkpoints import check_model
from ...pipeline import Stream
from ...streaming import run_layer
from ..layer_stats import LayerStats, capture, frozen, observe_entered
from ..neurons import apply_neurons, decide_neurons, finish_neurons, se_neurons
from ..result import make_result
from ..select import protected_by_layer
from ..structural import keep_layer_neurons, shared_multiplier_for
from .base import CALIB, MethodPlan, PruneMethod, start_plan

log = logging.getLogger(__name__)


def width_for(skeleton, ratio: float) -> int:
    """The intermediate width every expert keeps at ``ratio`` (a clear ValueError if none is left)."""
    adapter = check_model(skeleton)
    I = adapter.intermediate_size(skeleton.config)
    width = I - int(math.floor(ratio * I + 0.5))
    if not 0.0 < ratio < 1.0 or width < 1 or width >= I:
        raise ValueError(f"ratio {ratio} of an expert width of {I} neurons keeps {width}: the kept width must be "
                         f"in 1..{I - 1}")
    shared_multiplier_for(adapter, skeleton.config, width)  # a shared expert the config ties to the width
    return width


class _KeepInputs:
    """Forward-pass step: the calibration hidden states entering each layer from ``first`` on (moved to
    the host) and the layer's other arguments."""

    def __init__(self, first: int):
        self.first, self.hidden, self.args = first, {}, {}

    def on_layer(self, index: int, layer, inputs) -> None:
        if index >= self.first:
            self.hidden[index] = [h.to("cpu") for h in inputs.entered[CALIB]]  # [B, S, H] per chunk
            self.args[index] = inputs.entered_args[CALIB]


def _loss_grad(src, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/d(final hidden states) [B, S, H] of the model's next-token loss on one chunk."""
    h = final.detach().requires_grad_(True)
    ids = ids.to(src.device)
    with frozen(src.model), src.replayed(h) as model, torch.enable_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        return torch.autograd.grad(loss, h)[0]


def fisher_stats(src, mplan: MethodPlan, progress: bool = True) -> dict[int, LayerStats]:
    """HEAPr statistics with dL/dy from layer-wise gradient checkpointing over fresh passes of ``src``'s
    input (see the module docstring): two more reads of a streamed checkpoint."""
    chunks = list(mplan.calib.split(mplan.config.batch_size))
    first = min(mplan.moe_layers)
    fwd = src.fresh()
    keep = _KeepInputs(first)
    final = fwd.run({CALIB: Stream(chunks, before=True, keep_inputs=True)}, [keep], progress=progress,
                    desc="HEAPr gradients: forward")[CALIB]
    grads = [_loss_grad(fwd, h, ids) for h, ids in zip(final, chunks)]  # [B, S, H] per chunk
    del fwd, final
    bwd = src.fresh()
    ad = bwd.adapter
    se_channels = mplan.detail[1]  # {layer: {SE: massive channel}}: whose writer neurons to track
    stats = {l: LayerStats(mplan.num_experts, frozenset({"heapr"}), dict(se_channels.get(l, {})))
             for l in mplan.moe_layers}
    try:
        for i in tqdm(range(len(bwd.layers) - 1, first - 1, -1), desc="HEAPr gradients: backward", unit="layer",
                      disable=not progress):
            layer = bwd.open(i, then=i - 1 if i > first else None)  # streamed: i-1 read meanwhile
            moe = [i] if i in stats else []
            for c, (args, kwargs) in enumerate(keep.args[i]):
                h = keep.hidden[i][c].to(bwd.device).requires_grad_(True)  # the graph's root (its gradient: i > first)
                store: dict = {}
                with frozen(layer), capture(bwd.model, ad, moe, store, grads=True), torch.enable_grad():
                    out = run_layer(layer, h, args, kwargs)
                    wrt = ([h] if i > first else []) + [store[l]["y"] for l in moe]
                    g = torch.autograd.grad(out, wrt, grads[c])
                if i > first:
                    grads[c] = g[0]
                if moe:
                    store[i]["grad"] = g[-1].reshape(-1, g[-1].shape[-1])  # [T, H]
                    stats[i].observe_captured(ad.experts_of(ad.block_of(layer)), store[i])
            del keep.hidden[i], keep.args[i]
            bwd.close(i)
    finally:
        bwd.end()
    return stats


class NeuronLayers:
    def __init__(self, src, mplan: MethodPlan, stats: dict[int, LayerStats] | None = None):
        self.src, self.mplan, self.stats = src, mplan, stats
        self.width, self.se_channels = mplan.detail
        self.decisions, self.damaged = {}, []
        self.streams = {} if stats is not None else {
            CALIB: Stream(list(mplan.calib.split(mplan.config.batch_size)), before=True, keep_inputs=True)}

    def on_layer(self, index: int, layer, inputs) -> None:
        if index not in self.mplan.moe_layers:
            return
        ad = self.src.adapter
        stats = self.stats[index] if self.stats is not None else observe_entered(
            self.src.model, ad, index, layer, inputs.entered[CALIB], inputs.entered_args[CALIB],
            LayerStats(self.mplan.num_experts, frozenset({"heapr"}), dict(self.se_channels.get(index, {}))))
        block = ad.block_of(layer)
        found = se_neurons(ad.experts_of(block), stats, self.se_channels.get(index, {}))
        d = decide_neurons(stats, self.width, found if self.mplan.config.protect_super_experts else None)
        self.damaged += [(index, e) for e, js in found.items() if not set(js) <= set(d.keep[e].tolist())]
        apply_neurons(block, ad, d.keep)
        self.decisions[index] = d

    def on_end(self, model) -> None:
        finish_neurons(model, self.src.adapter, self.width)


class Heapr(PruneMethod):
    name = "heapr"
    needs_calibration = True
    changes_weights = True
    what = "width"

    def target(self, skeleton, config) -> int:
        return width_for(skeleton, config.ratio)

    def plan(self, skeleton, config, profile, calib=None) -> MethodPlan:
        width = self.target(skeleton, config)
        if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
            raise ValueError("HEAPr decides from calibration windows [N, S]; none were given")
        if config.hessian == "fisher" and getattr(skeleton.config, "output_router_logits", False):
            raise ValueError("HEAPr backpropagates the next-token loss layer by layer; this config adds the router's "
                             "load-balancing loss (output_router_logits: true), which it does not reproduce: use "
                             "hessian: identity")
        routed = protected_by_layer(profile.se_ids())
        se_channels = {l: {e: int(profile.arrays["out_channel"][l, e]) for e in es} for l, es in routed.items()}
        mplan = start_plan(skeleton, config, profile, calib=calib, detail=(width, se_channels))
        ad = check_model(skeleton)
        E = mplan.num_experts
        for l in mplan.moe_layers:  # on meta: the final shapes; which neurons stay is decided in the pass
            keep_layer_neurons(ad.experts_of(ad.block_of(ad.layers(skeleton)[l])),
                               torch.arange(width, device="cpu").repeat(E, 1))
        mplan.extra["width_before"] = ad.intermediate_size(skeleton.config)
        finish_neurons(skeleton, ad, width)
        return mplan

    def step(self, src, mplan: MethodPlan, progress: bool = True) -> NeuronLayers:
        stats = None
        if mplan.config.hessian == "fisher":
            log.info("HEAPr (Fisher): layer-wise gradient checkpointing over %d calibration windows",
                     mplan.calib.shape[0])
            stats = fisher_stats(src, mplan, progress)
        return NeuronLayers(src, mplan, stats)

    def result(self, mplan, step: NeuronLayers, profile, data_source, ppl=(None, None), seconds=0.0, **kw):
        ad = check_model(mplan.skeleton)
        after = ad.intermediate_size(mplan.skeleton.config)
        touched = sorted(step.damaged)
        extra = {"heapr": {"hessian": mplan.config.hessian, "intermediate_size_before": mplan.extra["width_before"],
                           "intermediate_size_after": after,
                           "layers": {str(l): d.to_json() for l, d in sorted(step.decisions.items())},
                           "super_experts_missing_massive_neurons": [list(t) for t in touched]}}
        notes = [f"expert FFN width {mplan.extra['width_before']} -> {after} (HEAPr, {mplan.config.hessian} Hessian)"]
        kept = {l: list(range(mplan.num_experts)) for l in mplan.moe_layers}
        return make_result(mplan, kept, profile, data_source, touched=touched, extra=extra, ppl=ppl, seconds=seconds,
                           notes=notes, touched_what="DAMAGED", **kw)
