"""The seed methods (PreMoe, UNCURL, DERN, STUN) on a model in memory: refusals up front, then run.

    check_seed(model, adapter, plan, calib_tokens, ses, cfg)      # before any compute (ValueError)
    out = run_seed(model, adapter, plan, calib_ids, ses, cfg)     # statistics -> decisions -> apply

``secompress.prune.api.prune`` dispatches here for these method names and turns the
:class:`SeedOutcome` into its ``PruneResult``. Each method's per-layer steps live in its own module
(:mod:`.premoe`, :mod:`.uncurl`, :mod:`.dern`, :mod:`.stun`) with its statistics in
:mod:`.seed_stats` and its criterion in ``*_math``; this file only wires them for a resident model.

| method | statistics (per layer) | what the layer keeps | task data |
|---|---|---|---|
| premoe | routing, TCESS | the K experts with the highest TCESS | yes: ``data`` is the task |
| uncurl | routing, router-logit Gram | K merged experts (spectral clusters) | yes |
| dern | routing | K retained experts, dropped neurons merged in | no |
| stun | routing (+ co-selection); then Wanda input norms | K representatives, then sparse weights | no |
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import MoEAdapter
from ..errors import SecompressError
from ..layout import PerExpertExperts
from . import dern, premoe, stun, uncurl
from .merge import check_groups
from .merging import merge_targets
from .seed_stats import collect_seed
from .select import PrunePlan, protected_by_layer

SEED_METHODS = ("premoe", "uncurl", "dern", "stun")
TASK_METHODS = ("premoe", "uncurl")  # the calibration data is the task's data
NEW_WEIGHTS = ("uncurl", "dern", "stun")  # write weights that are not the input's (no FP8-as-stored export)
_STATS = {"premoe": premoe.STATS, "uncurl": uncurl.STATS, "dern": dern.STATS}


@dataclass
class SeedOutcome:
    kept: dict[int, list[int]]  # layer -> original ids kept (new id = position)
    touched: list[tuple[int, int]]  # Super Experts removed, merged or changed
    extra: dict = field(default_factory=dict)  # the method's report (under "details")


def expert_widths(experts) -> list[int]:
    """Each routed expert's intermediate width (fused modules: one for all; per-expert: each its own)."""
    per = getattr(experts, "per_expert", None)
    if per is not None:
        return [int(m.gate_proj.weight.shape[0]) for m in per]
    w = experts.gate_up_proj  # [E, 2I, H] or transposed [E, H, 2I]
    I2 = w.shape[2] if getattr(experts, "is_transposed", False) else w.shape[1]
    return [int(I2) // 2] * int(w.shape[0])


def check_seed(model, adapter: MoEAdapter, plan: PrunePlan, calib_tokens: int, calib_source: str, ses, cfg) -> None:
    """Every refusal of a seed method before any compute: task data too short, experts of unequal
    width, Super Experts that cannot be spared at this ratio, a 2:4 pattern the shapes refuse."""
    m = cfg.method
    if m in TASK_METHODS and calib_tokens < cfg.task_min_tokens:
        raise ValueError(f"'{m}' prunes for a task: its task data '{calib_source}' gives {calib_tokens} tokens, fewer "
                         f"than task_min_tokens={cfg.task_min_tokens}; give more task text (or more/longer windows)")
    layers = adapter.layers(model)
    I = adapter.intermediate_size(model.config)
    for l in adapter.moe_layer_indices(model):
        ex = adapter.experts_of(adapter.block_of(layers[l]))
        if isinstance(ex, PerExpertExperts):
            raise SecompressError(f"layer {l} holds per-expert (defused) experts: prune the fused model")
        widths = sorted(set(expert_widths(ex)))
        if m in NEW_WEIGHTS and widths != [I]:
            raise ValueError(f"'{m}' combines experts' weights, which needs experts of one width: layer {l}'s routed "
                             f"experts are {widths} neurons wide (config {I})")
    if cfg.protect_super_experts:
        for l, prot in protected_by_layer(ses).items():
            if m == "uncurl":
                check_groups(merge_targets(plan), plan.groups(), prot, f"layer {l}: ")
            else:
                plan.check_protection(l, prot)
                for g in plan.groups():
                    free = len(set(g) - prot)
                    if m == "stun" and plan.remove_per_group > max(0, free - 1):
                        raise ValueError(f"layer {l}: {free} experts besides its Super Experts cannot form clusters "
                                         f"that remove {plan.remove_per_group}; keep more experts or switch "
                                         "protection off")
    if m == "uncurl" and cfg.uncurl_counts == "adaptive" and plan.n_group > 1:
        raise ValueError("UNCURL adaptive counts with grouped routing (n_group > 1) are not supported: use "
                         "uncurl_counts='uniform'")
    if m == "stun" and cfg.stun_pattern == "2:4" and cfg.stun_sparsity > 0:
        H = int(model.config.hidden_size)
        if cfg.stun_sparsity != 0.5 or H % 4 or I % 4:
            raise ValueError(f"STUN's 2:4 pattern zeros 2 of every 4 inputs: it needs stun_sparsity 0.5 (got "
                             f"{cfg.stun_sparsity}) and hidden size {H} and expert width {I} divisible by 4; use "
                             "stun_pattern='unstructured' otherwise")


def run_seed(model, adapter: MoEAdapter, plan: PrunePlan, calib_ids: torch.Tensor, ses, cfg,
             progress: bool = False) -> SeedOutcome:
    """Statistics on ``calib_ids [N, S]``, then the method on every MoE layer, in place."""
    m, protect = cfg.method, cfg.protect_super_experts
    k = cfg.tcess_top_k or adapter.top_k(model.config)
    want = stun.stats_for(cfg.stun_similarity) if m == "stun" else _STATS[m]
    stats = collect_seed(model, adapter, calib_ids, cfg.batch_size, want, tcess_k=k, tcess_r=cfg.tcess_threshold,
                         progress=progress)
    if m == "premoe":
        ds, touched = premoe.premoe_model(model, adapter, stats, plan, ses, protect)
        extra = {"tcess_top_k": k, "tcess_threshold": cfg.tcess_threshold,
                 "layers": {str(l): d.to_json() for l, d in ds.items()}}
        return SeedOutcome({l: list(d.keep) for l, d in ds.items()}, touched, {"premoe": extra})
    if m == "uncurl":
        ds, touched, counts = uncurl.uncurl_model(model, adapter, stats, plan, ses, protect, cfg.uncurl_counts,
                                                  cfg.seed)
        extra = {**counts, "groups": {str(l): d.to_json() for l, d in ds.items()},
                 "router": "each cluster keeps its most routed member's router row (first id of the group)"}
        return SeedOutcome({l: d.representatives for l, d in ds.items()}, touched, {"uncurl": extra})
    if m == "dern":
        ds, touched = dern.dern_model(model, adapter, stats, plan, ses, protect, cfg.dern_threshold)
        extra = {"threshold": cfg.dern_threshold, "layers": {str(l): d.to_json() for l, d in ds.items()}}
        return SeedOutcome({l: list(d.retained) for l, d in ds.items()}, touched, {"dern": extra})
    if m == "stun":
        ds, touched, rep = stun.stun_model(model, adapter, stats, plan, ses, calib_ids, cfg.batch_size, protect,
                                           cfg.stun_sparsity, cfg.stun_pattern, cfg.stun_similarity)
        extra = {**rep, "clusters": {str(l): d.to_json() for l, d in ds.items()}}
        return SeedOutcome({l: d.keep for l, d in ds.items()}, touched, {"stun": extra})
    raise ValueError(f"unknown seed method '{m}'; known: {', '.join(SEED_METHODS)}")
