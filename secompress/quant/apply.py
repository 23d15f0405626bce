"""The quantization stage: ``plan_quantization`` (the validated plan) and ``quantize_`` (apply it).

    plan = quantize_(model, QuantConfig(bits=4, group_size=32, se_bits=16), profile=prof)

``quantize_`` resolves a :class:`~secompress.quant.plan.QuantPlan` (rules, default bits,
Super-Expert protection, optionally a bit allocation for an average bit-width), checks it
with the method's backend, then lets the backend replace the weights. Units planned None
are kept bit-identical. Every check runs before any weight changes.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..checkpoints import check_model
from ..profile import profile_for
from .allocate import allocate
from .backends import QuantContext, exporter
from .config import QuantConfig
from .coverage import check_coverage
from .plan import QuantPlan, resolve_plan

log = logging.getLogger(__name__)


def needs_profile(config: QuantConfig) -> bool:
    """Whether quantizing with ``config`` uses a profile (SEs, allocation, or calibration coverage: not
    under all-expert calibration, where every expert sees every token)."""
    return (config.protect_super_experts or config.avg_bits is not None
            or (_checks_coverage(config.backend) and config.calibration != "all-experts"))


def _checks_coverage(backend) -> bool:
    return backend.calibrated and not backend.covers_uncalibrated


def plan_quantization(model, config: QuantConfig, profile=None, tokenizer=None, data="builtin",
                      ses=None) -> QuantPlan:
    """The plan ``quantize_`` would apply, validated against the model (nothing is changed). ``ses``:
    the Super Experts to protect when not the profile's (e.g. ``(layer, None)`` for an SE whose id a
    merge decides later)."""
    backend = config.backend
    backend.require()  # a missing extra is named first
    check_model(model)
    for note in config.check_model(model):  # a scheme the shapes cannot serve: refused before any statistics
        log.warning("scheme %s: %s", config.scheme, note)
    prof = profile_for(model, profile, tokenizer, data) if needs_profile(config) else None
    if ses is None:
        ses = prof.se_ids() if prof is not None else []
    ses = ses if config.protect_super_experts else []
    meta: dict[str, Any] = {"method": config.method, "group_size": config.group_size, "symmetric": config.symmetric,
            "protect_super_experts": config.protect_super_experts}
    if config.calibration != "routed":
        meta["calibration"] = config.calibration
    if config.format is not None:
        meta["format"] = config.format  # the export format save_quantized writes
    if config.scale_dtype != "model":
        meta["scale_dtype"] = config.scale_dtype  # the export's scales (compressed-tensors)
    if config.scheme is not None:
        meta["scheme"] = config.scheme  # the compressed-tensors preset (its backend: plan.meta["backend"])
        meta["backend"] = backend.name
        meta["options"] = dataclasses.asdict(config.options)  # serving: how secompress.load forwards the export
    assert config.se_mode is not None  # resolved when the config was built
    plan = resolve_plan(model, config.rules, ses, config.se_mode, config.se_bits, config.bits, meta)
    if _checks_coverage(backend) and config.calibration != "all-experts":
        check_coverage(prof, config.fallback)  # an expert no calibration token reached: error unless fallback 'rtn'
    if config.avg_bits is not None:
        plan = _allocate(plan, prof, config)
    backend.check_plan(plan, config)
    plan.artifacts["compatibility"] = exporter(plan.meta).compatibility(plan)  # the export format's report
    return plan


def _allocate(plan: QuantPlan, prof, config: QuantConfig) -> QuantPlan:
    """Routed experts' bits from :func:`~secompress.quant.allocate.allocate`; importance = routed-token share.

    Pinned: SE-protected experts (at their protected bits), rule-matched experts, and (with
    fallback 'rtn') uncalibrated experts at ``config.bits``. se_mode 'layer' allocates per layer.
    """
    missing = set(check_coverage(prof, config.fallback))
    tokens = prof.arrays["tokens"]  # [L, E + 1]
    experts = [u for u in plan.units.values() if u.expert is not None]
    per_layer = config.se_mode == "layer"
    groups: dict = {}
    for u in experts:
        groups.setdefault(u.layer if per_layer else u.name, []).append(u)
    keys = list(groups)
    imp = [float(sum(max(0, tokens[u.layer, u.expert]) for u in groups[k])) for k in keys]
    par = [sum(u.params for u in groups[k]) for k in keys]
    bits, source = dict(plan.bits), dict(plan.source)
    pinned, cand = {}, sorted(set(config.candidate_bits) | ({16} if config.se_bits is None else {8}))
    for i, k in enumerate(keys):
        us = groups[k]
        fixed = [u for u in us if source[u.name] in ("se", "exact", "regex")]
        if fixed:
            pinned[i] = max(bits[u.name] or 16 for u in fixed)
        elif any((u.layer, u.expert) in missing for u in us):
            pinned[i] = config.bits
            for u in us:
                source[u.name] = "fallback"
    assert config.avg_bits is not None
    res = allocate(imp, par, cand, config.avg_bits, pinned)
    for i, k in enumerate(keys):
        for u in groups[k]:
            bits[u.name] = None if res.bits[i] == 16 else res.bits[i]
            if i not in pinned:
                source[u.name] = "alloc"
    meta = {**plan.meta, "allocation": {**res.to_json(), "granularity": "layer" if per_layer else "expert",
                                        "candidates": cand, "uncalibrated": sorted(map(list, missing))}}
    log.info("allocation: average %.3f bits over routed experts (target %.3f)", res.average, res.target)
    return QuantPlan(bits, plan.units, source, plan.super_experts, plan.se_mode, plan.se_bits, meta)


def quantize_(model, config: QuantConfig, profile=None, tokenizer=None, data="builtin",
              work: str | Path | None = None, source: str | Path | None = None) -> QuantPlan:
    """Quantize ``model`` in place following ``config``; returns the plan applied.

    The Super Experts come from ``profile`` (a :class:`~secompress.profile.ProfileResult`), or
    from profiling ``data`` with ``tokenizer`` now (calibrated backends, gptq: their windows too).
    ``work`` and ``source`` are accepted for backends that work on a checkpoint (none built in).
    ``save_quantized`` writes the result.
    """
    backend = config.backend
    backend.require()
    if needs_profile(config):
        profile = profile_for(model, profile, tokenizer, data)  # once, for the plan and the backend
    plan = plan_quantization(model, config, profile, tokenizer, data)
    ctx = QuantContext(tokenizer=tokenizer, profile=profile, data=data,
                       work=None if work is None else Path(work), source=None if source is None else Path(source))
    return backend.apply(model, plan, config, ctx)
