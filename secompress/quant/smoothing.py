"""Smoothing folded into a decoder layer: SmoothQuant per norm and EAQuant for the MoE shared input.

    s = smooth_layer(layer, adapter, stats, run, SmoothConfig())     # in place; returns what was folded

For every normalisation whose output feeds Linear layers (found by data flow on one forward ``run()``:
the consumers read the norm's output tensor; nothing is matched by name), the factor ``s`` is folded
exactly: the norm's weight (and bias) divided by ``s``, the consumers' input columns multiplied by it.
Attention inputs get SmoothQuant's factor (Xiao et al. 2023, arXiv 2211.10438); the MoE block's input
(router, routed experts, shared expert) one EAQuant aggregated vector (:mod:`.smooth_math`), folded into
the router's columns too, so the router's logits are unchanged in exact arithmetic (EAQuant does the
same; in the model's dtype they change by rounding only: :func:`smooth_layer` checks the layer's output
and routing on ``run()`` and undoes everything beyond tolerance). Each expert's down projection gets
EAQuant's outlier-channel factor, folded into the up projection's rows (valid when the activation is
``act(gate) * up``: transformers' default gate, not GPT-OSS's clamped one, which is skipped).

Super Experts: the statistics exclude massive tokens by default (``clean=True``): the one massive token
per sequence a Super Expert writes would otherwise set ``s`` on its channels and move the outlier into
every expert's weight columns; its quantization is left to the input-scale rule. Where a Super Expert's
own down-projection input holds its massive neuron, the outlier-channel factor shrinks that channel
explicitly (EAQuant's rule), which also lowers the layer's shared FP8 ``w2`` input scale.
Legend: E experts, H hidden size, I expert FFN width, In in features.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..experts import layout_of, split_gate_up
from . import smooth_math

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float = 0.5  # SmoothQuant migration strength
    moe: bool = True  # EAQuant aggregation on the MoE block's input
    attention: bool = True  # SmoothQuant on the attention's (and dense MLP's) input
    down: bool = True  # EAQuant outlier channels of each expert's down projection
    router_term: bool = True  # the router's own factor in the aggregation (the paper's rule)
    clean: bool = True  # statistics without massive tokens
    tolerance: float = 2e-2  # relative change of the layer output allowed after folding (dtype rounding)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def _gate_linear_in_up(experts: nn.Module) -> bool:
    """True when the experts' activation is ``act(gate) * up`` (transformers' default gate)."""
    from transformers.integrations.moe import _default_apply_gate

    return getattr(type(experts), "_apply_gate", None) is _default_apply_gate


@torch.no_grad()
def norm_consumers(layer: nn.Module, adapter, run) -> dict[str, list[str]]:
    """Norm-like module name -> names of the modules reading its output (Linear layers, the router,
    the experts), from the tensors one forward ``run()`` passes: a consumer's input is the norm's output."""
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    inside = {id(m) for m in experts.modules()} if experts is not None else set()
    outs, ins, handles = {}, {}, []
    names = {id(m): n for n, m in layer.named_modules()}
    special = {}
    if block is not None:
        special[id(adapter.router_of(block))] = names[id(adapter.router_of(block))]
        special[id(experts)] = names[id(experts)]
    for n, m in layer.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, nn.Linear) and id(m) not in inside:
            # the output is kept alive during run(): a freed tensor's address could be reused by a later one
            handles.append(m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, (o.data_ptr(), o))))
        if (isinstance(m, nn.Linear) and id(m) not in inside) or id(m) in special:
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, n=n: ins.__setitem__(n, (a[0].data_ptr(), a[0])) if a else None))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    # every recorded tensor stays alive until here, so equal addresses mean the same storage
    found = {nrm: sorted(c for c, (p, _) in ins.items() if p == ptr) for nrm, (ptr, _) in outs.items()}
    return {k: v for k, v in found.items() if v}


def _scale_columns(module: nn.Module, s: torch.Tensor, adapter, experts) -> None:
    if module is experts:
        gu = experts.gate_up_proj  # [E, 2I, H] (transposed: [E, H, 2I])
        gu.mul_((s[None, :, None] if layout_of(experts).transposed else s[None, None, :]).to(gu.dtype))
    else:
        module.weight.mul_(s[None, :].to(module.weight.dtype))


@torch.no_grad()
def fold_into_norm(layer: nn.Module, norm: str, consumers: list[str], s: torch.Tensor, adapter) -> None:
    """``norm.weight /= s`` and every consumer's input columns ``*= s`` (exact in real arithmetic)."""
    n = layer.get_submodule(norm)
    n.weight.div_(s.to(n.weight.dtype))
    if getattr(n, "bias", None) is not None:
        n.bias.div_(s.to(n.bias.dtype))
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    for c in consumers:
        _scale_columns(layer.get_submodule(c), s, adapter, experts)


@torch.no_grad()
def fold_down(experts: nn.Module, e: int, s: torch.Tensor) -> None:
    """Expert ``e``: up-projection rows ``/= s``, down-projection input columns ``*= s`` ([I])."""
    lay = layout_of(experts)
    gu = experts.gate_up_proj[e]  # [2I, H] (transposed: [H, 2I])
    _, up = split_gate_up(gu.T if lay.transposed else gu, lay.concatenated)  # views [I, H]
    up.div_(s[:, None].to(up.dtype))
    if lay.has_bias:
        _, ub = split_gate_up(experts.gate_up_proj_bias[e], lay.concatenated)
        ub.div_(s.to(ub.dtype))
    dn = experts.down_proj[e]  # [H, I] (transposed: [I, H])
    dn.mul_((s[:, None] if lay.transposed else s[None, :]).to(dn.dtype))


def _routing(layer, adapter, run):
    """The routing (top-k ids per token) of one ``run()``."""
    block = adapter.block_of(layer)
    if block is None:
        return None
    got = []
    h = adapter.experts_of(block).register_forward_pre_hook(lambda m, a: got.append(a[1].clone()))
    try:
        run()
    finally:
        h.remove()
    return torch.cat([g.sort(-1).values for g in got])


@torch.no_grad()
def smooth_layer(layer: nn.Module, adapter, stats, run, config: SmoothConfig = SmoothConfig(),
                 quantized: set[str] | None = None) -> dict:
    """Fold smoothing factors into ``layer`` in place from its calibration ``stats``
    (:class:`~secompress.quant.actstats.LayerStats`); ``run()`` sends one batch through the layer.
    ``quantized``: the module names whose inputs get quantized (others are not smoothed; None: all).
    Returns {norm: {"consumers", "max_factor"}, "down": {expert: max factor}}."""
    block = adapter.block_of(layer)
    experts = adapter.experts_of(block) if block is not None else None
    ename = None if experts is None else next(n for n, m in layer.named_modules() if m is experts)
    if quantized is not None:  # assignments name the experts by the adapter's attribute
        quantized = {ename if n == adapter.experts else n for n in quantized}
    pick = (lambda st: st.channel_amax_clean) if config.clean else (lambda st: st.channel_amax)
    report: dict = {}
    saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    out_ref, route_ref = _capture(layer, run), _routing(layer, adapter, run)
    for norm, cons in norm_consumers(layer, adapter, run).items():
        moe = ename in cons
        if quantized is not None and not any(c in quantized for c in cons):
            continue
        if moe and config.moe:
            seen = [e for e, st in enumerate(stats.w13) if st.channel_amax is not None]
            act_all = torch.stack([pick(stats.w13[e]) for e in seen]).amax(0)
            per = torch.stack([smooth_math.smoothquant_factor(
                pick(stats.w13[e]), smooth_math.column_amax([experts.gate_up_proj[e].T if layout_of(experts).transposed
                                                             else experts.gate_up_proj[e]]), config.alpha)
                for e in seen])
            router = adapter.router_of(block)
            r = smooth_math.smoothquant_factor(act_all, smooth_math.column_amax([router.weight]), config.alpha) \
                if config.router_term else None
            lins = [c for c in cons if c not in (ename,) and isinstance(layer.get_submodule(c), nn.Linear)]
            sh = smooth_math.smoothquant_factor(act_all, smooth_math.column_amax(
                [layer.get_submodule(c).weight for c in lins]), config.alpha) if lins else None
            s = smooth_math.aggregate(per, r, sh)
        elif not moe and config.attention:
            lins = [c for c in cons if c in stats.linears]
            if not lins:
                continue
            s = smooth_math.smoothquant_factor(pick(stats.linears[lins[0]]),
                                               smooth_math.column_amax([layer.get_submodule(c).weight for c in cons]),
                                               config.alpha)
        else:
            continue
        fold_into_norm(layer, norm, cons, s, adapter)
        report[norm] = {"consumers": cons, "max_factor": float(s.max()), "min_factor": float(s.min())}
    if experts is not None and config.down and (quantized is None or ename in quantized):
        if _gate_linear_in_up(experts):
            report["down"] = {}
            for e, st in enumerate(stats.w2):
                if st.channel_amax is None:
                    continue
                s = smooth_math.outlier_factor(pick(st))
                if bool((s != 1).any()):
                    fold_down(experts, e, s)
                    report["down"][e] = float(s.max())
        else:
            log.info("%s: the experts' activation is not act(gate) * up: down projections not smoothed",
                     type(experts).__name__)
    out, route = _capture(layer, run), _routing(layer, adapter, run)
    err = float((out - out_ref).norm() / out_ref.norm().clamp(min=1e-12))
    flips = 0.0 if route is None else float((route != route_ref).any(-1).float().mean())
    report["output_change"], report["routing_change"] = err, flips
    if err > config.tolerance:
        layer.load_state_dict(saved)
        raise ValueError(f"smoothing changed the layer's output by {err:.2e} (> {config.tolerance}): undone")
    return report


def _capture(layer, run) -> torch.Tensor:
    got = []
    h = layer.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach().float()))
    try:
        run()
    finally:
        h.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got])
