"""Expert merging (M-SMoE, HC-SMoE) and HEAPr neuron pruning on the layer-by-layer engine.

    rplan = plan_restructure(skeleton, adapter, PruneConfig(0.5, "m-smoe"), profile, calib_ids)  # meta, up front
    cb = restructure_callback(eng, rplan)    # HEAPr with the Fisher Hessian: its two gradient passes run here
    eng.run({**streams, **cb.streams}, [cb, quantize, export])   # per MoE layer: statistics -> decision -> apply
    result = streamed_result(rplan, plan.model, cb.record, ...)  # the prune report, as in memory

Up front (:func:`plan_restructure`, no weight read): the in-memory refusals (a merge target below
top_k or a Super Expert that cannot stay alone, a width below 1, a profile of another model) and the
skeleton's final shapes (K experts per MoE layer, or I' neurons per expert), so every output tensor's
spec is known before the pass.

During the pass (:class:`RestructureLayers`), each MoE layer's statistics come from the calibration
windows' hidden states *entering that layer in the original model*: the engine's ``before`` stream
:data:`CALIB` opened with ``keep_inputs`` (:attr:`secompress.engine.LayerInputs.entered`). The
callback reruns the layer, not yet changed, on them under the in-memory driver's hooks
(:func:`~secompress.prune.layer_stats.capture`, :meth:`LayerStats.observe_captured`), chunk by chunk
in the order and batch size of :func:`~secompress.prune.layer_stats.collect`; then decides
(:func:`decide_merge` / :func:`decide_neurons` with :func:`se_neurons`) and applies exactly as the
in-memory path does. Cost: one more forward of the calibration windows per layer, and one more
[N, S, H] copy of them alive while the callbacks run.

HEAPr's Fisher scores need dL/dy, y the routed experts' output of each MoE layer, for the model's
next-token loss (the one :func:`collect` backpropagates): :func:`fisher_stats` does layer-wise
gradient checkpointing. A forward pass stores the calibration hidden states entering every layer
from the first MoE layer on (host memory: (L - l0) x N x S x H in the compute dtype); the model's
own head and loss give dL/d(final hidden states) (:meth:`LayerEngine.replayed`); then layers
L-1..l0 are materialised one at a time, their forward recomputed from the stored inputs with
gradients on (parameters frozen), the incoming gradient backpropagated, dL/dy recorded into that
layer's statistics and dL/d(input) handed to the layer below. Two more reads of the checkpoint.
Legend: L decoder layers, l0 first MoE layer, N calibration windows, S sequence length, H hidden
size, E experts before, K after, I expert width before, I' after.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import MoEAdapter
from ..engine import LayerEngine, LayerInputs, Stream
from ..errors import SecompressError
from ..streaming import build_skeleton, materialise, release, run_layer
from .layer_stats import LayerStats, capture, frozen
from .merge import check_groups
from .merging import MERGE_METHODS, apply_merge, decide_merge, finish_merge, merge_targets, merged_super_experts
from .neurons import apply_neurons, decide_neurons, finish_neurons, se_neurons
from .select import protected_by_layer
from .structural import keep_layer_experts, keep_layer_neurons, model_size

log = logging.getLogger(__name__)
CALIB = "calibration"  # the engine stream of the calibration windows


@dataclass
class RestructurePlan:
    """What :func:`plan_restructure` decided on the meta skeleton."""

    config: object  # PruneConfig (a merge method or heapr)
    calib: torch.Tensor  # [N, S] calibration windows
    target: object  # merge: the PrunePlan (K = num_keep); HEAPr: the kept width I'
    moe_layers: list[int]
    num_experts: int  # E
    width_before: int  # I
    super_experts: list  # the profile's SE ids (absolute rule)
    se_channels: dict[int, dict[int, int]]  # {layer: {routed SE: its massive channel}}
    sizes_before: tuple[int, int]  # (parameters, bytes) of the skeleton before, in the compute dtype

    @property
    def merge(self) -> bool:
        return self.config.method in MERGE_METHODS

    @property
    def fisher(self) -> bool:
        return not self.merge and self.config.hessian == "fisher"

    def chunks(self) -> list[torch.Tensor]:
        return list(self.calib.split(self.config.batch_size))  # as collect() batches them

    def new_stats(self, layer: int) -> LayerStats:
        want = MERGE_METHODS[self.config.method][0] if self.merge else ("heapr",)
        return LayerStats(self.num_experts, frozenset(want), {} if self.merge else dict(self.se_channels.get(layer, {})))


def plan_restructure(model: nn.Module, adapter: MoEAdapter, config, profile, calib: torch.Tensor | None
                     ) -> RestructurePlan:
    """Refuse what the in-memory path refuses, then give the meta skeleton ``model`` its final shapes."""
    from ..profile import check_profile_matches
    from .api import plan_for

    if calib is None or calib.ndim != 2 or calib.shape[0] < 1:
        raise SecompressError(f"streamed '{config.method}' decides from calibration windows: pass them as "
                              "plan_streamed(..., calib=ids [N, S])")
    check_profile_matches(profile, model)
    if config.method not in MERGE_METHODS and config.hessian == "fisher" and \
            getattr(model.config, "output_router_logits", False):
        raise SecompressError("streamed HEAPr backpropagates the next-token loss layer by layer; this config adds "
                              "the router's load-balancing loss (output_router_logits: true), which it does not "
                              "reproduce: use hessian: identity, or model.streaming: false")
    target = plan_for(model, config.ratio, config.method)  # ValueError: below top_k, or no width left
    moe = adapter.moe_layer_indices(model)
    routed = protected_by_layer(profile.se_ids())
    merge = config.method in MERGE_METHODS
    if merge and config.protect_super_experts:
        for layer in moe:
            check_groups(merge_targets(target), target.groups(), routed.get(layer, set()), f"layer {layer}: ")
    E, I = adapter.num_experts(model.config), adapter.intermediate_size(model.config)
    se_channels = {l: {e: int(profile.arrays["out_channel"][l, e]) for e in es} for l, es in routed.items()}
    rplan = RestructurePlan(config, calib, target, moe, E, I, profile.se_ids(), se_channels, model_size(model))
    layers = adapter.layers(model)
    for l in moe:  # on meta: only the shapes matter, which experts / neurons stay is decided in the pass
        block = adapter.block_of(layers[l])
        if merge:
            keep_layer_experts(block, adapter, list(range(target.num_keep)), adapter.block_path(l))
        else:
            keep_layer_neurons(adapter.experts_of(block), torch.arange(target, device="cpu").repeat(E, 1))
    if merge:
        finish_merge(model, adapter, target.num_keep)
    else:
        finish_neurons(model, adapter, target)
    return rplan


@dataclass
class Record:
    """The decisions of a pass, per MoE layer, for the report."""

    decisions: dict = field(default_factory=dict)  # layer -> MergeDecision | NeuronDecision
    damaged: list = field(default_factory=list)  # HEAPr: (layer, SE) that lost a massive-channel neuron


class RestructureLayers:
    """The per-layer callback: statistics (unless given), decision, applied to the layer in place."""

    def __init__(self, eng: LayerEngine, rplan: RestructurePlan, stats: dict[int, LayerStats] | None = None):
        self.eng, self.rplan, self.stats = eng, rplan, stats
        self.record = Record()
        self.protected = protected_by_layer(rplan.super_experts) if rplan.config.protect_super_experts else {}
        # the engine streams this callback needs (none when the statistics were gathered already)
        self.streams = {} if stats is not None else {CALIB: Stream(rplan.chunks(), before=True, keep_inputs=True)}

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        if index not in self.rplan.moe_layers:
            return
        ad, rp = self.eng.adapter, self.rplan
        stats = self.stats[index] if self.stats is not None else self._observe(index, layer, inputs)
        block = ad.block_of(layer)
        if rp.merge:
            d = decide_merge(rp.config.method, stats, rp.target, self.protected.get(index, ()))
            apply_merge(block, ad, d, stats.freq, MERGE_METHODS[rp.config.method][1], ad.block_path(index))
        else:
            found = se_neurons(ad.experts_of(block), stats, rp.se_channels.get(index, {}))
            d = decide_neurons(stats, rp.target, found if rp.config.protect_super_experts else None)
            self.record.damaged += [(index, e) for e, js in found.items() if not set(js) <= set(d.keep[e].tolist())]
            apply_neurons(block, ad, d.keep)
        self.record.decisions[index] = d

    @torch.no_grad()
    def _observe(self, index: int, layer, inputs: LayerInputs) -> LayerStats:
        """The layer, still as in the original model, on the calibration windows entering it."""
        ad = self.eng.adapter
        experts = ad.experts_of(ad.block_of(layer))
        stats = self.rplan.new_stats(index)
        for h, (args, kwargs) in zip(inputs.entered[CALIB], inputs.entered_args[CALIB]):
            store: dict = {}
            with capture(self.eng.model, ad, [index], store, grads=False):
                run_layer(layer, h, args, kwargs)
            stats.observe_captured(experts, store[index])
        return stats


class _KeepInputs:
    """Forward-pass callback: the calibration hidden states entering each layer from ``first`` on
    (moved to the host) and the layer's other arguments."""

    def __init__(self, first: int):
        self.first, self.hidden, self.args = first, {}, {}

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        if index >= self.first:
            self.hidden[index] = [h.to("cpu") for h in inputs.entered[CALIB]]  # [B, S, H] per chunk
            self.args[index] = inputs.entered_args[CALIB]


def _loss_grad(eng: LayerEngine, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/d(final hidden states) [B, S, H] of the model's next-token loss on one chunk (as collect's)."""
    h = final.detach().requires_grad_(True)
    ids = ids.to(eng.device)
    with frozen(eng.model), eng.replayed(h) as model, torch.enable_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        return torch.autograd.grad(loss, h)[0]


def fisher_stats(path: str | Path, config, dtype: torch.dtype, device: torch.device, rplan: RestructurePlan,
                 progress: bool = True) -> dict[int, LayerStats]:
    """HEAPr statistics with dL/dy from layer-wise gradient checkpointing (see the module's docstring)."""
    chunks = rplan.chunks()
    first = min(rplan.moe_layers)
    fwd = LayerEngine(path, dtype, device, config)
    keep = _KeepInputs(first)
    final = fwd.run({CALIB: Stream(chunks, before=True, keep_inputs=True)}, [keep], progress=progress,
                    desc="HEAPr gradients: forward")[CALIB]
    grads = [_loss_grad(fwd, h, ids) for h, ids in zip(final, chunks)]  # [B, S, H] per chunk
    ckpt, adapter = fwd.ckpt, fwd.adapter
    del fwd, final  # embeddings and head are not needed below
    skeleton = build_skeleton(copy.deepcopy(config))
    layers = adapter.layers(skeleton)
    stats = {l: rplan.new_stats(l) for l in rplan.moe_layers}
    for i in tqdm(range(len(layers) - 1, first - 1, -1), desc="HEAPr gradients: backward", unit="layer",
                  disable=not progress):
        layer = layers[i]
        materialise(layer, f"{adapter.layers_path}.{i}.", ckpt, adapter, dtype, device)
        moe = [i] if i in stats else []
        for c, (args, kwargs) in enumerate(keep.args[i]):
            h = keep.hidden[i][c].to(device).requires_grad_(True)  # the graph's root (its gradient: i > first)
            store: dict = {}
            with capture(skeleton, adapter, moe, store, grads=True), torch.enable_grad():
                out = run_layer(layer, h, args, kwargs)
                wrt = ([h] if i > first else []) + [store[l]["y"] for l in moe]
                g = torch.autograd.grad(out, wrt, grads[c])
            if i > first:
                grads[c] = g[0]
            if moe:
                store[i]["grad"] = g[-1].reshape(-1, g[-1].shape[-1])  # [T, H]
                stats[i].observe_captured(adapter.experts_of(adapter.block_of(layer)), store[i])
        del keep.hidden[i], keep.args[i]
        release(layer)
    return stats


def restructure_callback(eng: LayerEngine, rplan: RestructurePlan, progress: bool = True) -> RestructureLayers:
    """The callback for ``eng``'s pass; HEAPr with the Fisher Hessian first runs its two gradient passes."""
    stats = None
    if rplan.fisher:
        log.info("HEAPr (Fisher): layer-wise gradient checkpointing over %d calibration windows",
                 rplan.calib.shape[0])
        stats = fisher_stats(eng.path, eng.config, eng.dtype, eng.device, rplan, progress)
    return RestructureLayers(eng, rplan, stats)


def streamed_result(rplan: RestructurePlan, model: nn.Module, record: Record, profile, data_source: str,
                    ppl: tuple, seconds: float):
    """The :class:`~secompress.prune.api.PruneResult` of a streamed merge / HEAPr pass (``model``: the
    plan's final skeleton, for the config and the sizes after)."""
    from .api import restructure_result

    cfg = rplan.config
    if sorted(record.decisions) != rplan.moe_layers:
        raise SecompressError(f"the streamed pass decided MoE layers {sorted(record.decisions)}, expected "
                              f"{rplan.moe_layers}: no report for an unfinished pass")
    touched = merged_super_experts(record.decisions, rplan.super_experts) if rplan.merge else sorted(record.damaged)
    return restructure_result(cfg, model, rplan.num_experts, rplan.moe_layers, record.decisions, touched,
                              (*rplan.sizes_before, *model_size(model)), profile, data_source, None, ppl, seconds,
                              rplan.width_before)
