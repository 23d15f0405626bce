"""The pruning stage: remove, merge or narrow a share of every MoE layer's routed experts, sparing Super Experts.

    result = prune(model, tokenizer, PruneConfig(ratio=0.25, method="reap"))
    save_pruned(model, tokenizer, result, "out/")

``prune`` runs the method's per-layer step (:mod:`secompress.prune.methods`, the registry
``PRUNE_METHODS``) over the model in memory, a resident source of the one loop
(:mod:`secompress.pipeline`); the streamed path runs the same step over the checkpoint's shards
(:mod:`secompress.compress`). Steps: validate the ratio against the router (or the expert width)
before anything else; profile the model unless a profile is given (its statistics feed the
scores, and its Super Experts, Su et al. 2025 arXiv 2507.23279, are protected); plan on a meta
skeleton (the final shapes, and everything decided without weights); one pass: held-out windows
through each original layer (perplexity before), the method's step (statistics -> decision ->
apply), the windows through the changed layer (perplexity after).

``ratio`` is the share of each MoE layer's routed experts removed (pruning) or merged away
(merging), and for HEAPr the share of every expert's intermediate width removed.
Legend: N windows, S sequence length.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..checkpoints import check_model
from ..data import CalibrationData, load_calibration
from ..errors import SecompressError
from ..outputs import atomic_dir
from ..pipeline import Resident, Stream, run_pass
from ..profile import ProfileConfig, ProfileResult, check_profile_matches, profile_for
from ..streaming import build_skeleton
from .config import PruneConfig
from .methods import PRUNE_METHODS
from .result import REPORT_NAME, PruneResult, remap_profile, summary_table

log = logging.getLogger(__name__)
ALL_METHODS = tuple(PRUNE_METHODS)

__all__ = ["ALL_METHODS", "REPORT_NAME", "PruneConfig", "PruneResult", "plan_for", "prune", "remap_profile",
           "save_pruned", "summary_table"]


def _split_data(data, eval_data, tokenizer, cfg: PruneConfig) -> tuple[CalibrationData, CalibrationData | None]:
    """Calibration windows and disjoint held-out windows (the ones after them, or from ``eval_data``)."""
    if isinstance(data, CalibrationData):
        calib_all = data
    else:
        if tokenizer is None:
            raise SecompressError("a tokenizer is needed to tokenize calibration text")
        extra = cfg.eval_samples if eval_data is None else 0
        calib_all = load_calibration(data, tokenizer, cfg.calib_samples + extra, cfg.seq_len)
    if cfg.eval_samples == 0:
        return calib_all, None
    if eval_data is not None:
        ev = eval_data if isinstance(eval_data, CalibrationData) else \
            load_calibration(eval_data, tokenizer, cfg.eval_samples, cfg.seq_len)
        return calib_all, ev
    ids = calib_all.input_ids  # [N, S]
    n = ids.shape[0]
    if n < 2:
        raise SecompressError(f"calibration data '{calib_all.source}' gives {n} window of {cfg.seq_len} tokens: "
                              "too few to hold some out for perplexity; use more text or a shorter seq_len")
    n_eval = min(cfg.eval_samples, n // 2) if n < cfg.calib_samples + cfg.eval_samples else cfg.eval_samples
    if n_eval < cfg.eval_samples:
        log.warning("only %d windows: %d for calibration, %d held out", n, n - n_eval, n_eval)
    cut = n - n_eval
    return (CalibrationData(ids[:cut], calib_all.source, calib_all.sha256),
            CalibrationData(ids[cut:], f"{calib_all.source} (held-out windows {cut}..{n - 1})", calib_all.sha256))


def plan_for(model, ratio: float, method: str = "reap"):
    """The validated target of pruning ``model`` (or a skeleton) by ``ratio`` with ``method``: the
    :class:`~secompress.prune.select.PrunePlan`, or the kept width for a width method; a clear
    ValueError when the router or the width cannot take it."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown method '{method}'; known: {', '.join(PRUNE_METHODS)}")
    return PRUNE_METHODS[method].target(model, PruneConfig(ratio=ratio, method=method))


def prune(model, tokenizer, config: PruneConfig, profile: ProfileResult | None = None,
          data: str | Path | CalibrationData = "builtin", eval_data: str | Path | CalibrationData | None = None,
          progress: bool = False) -> PruneResult:
    """Prune ``model`` in place by ``config`` (see the module docstring); raises before changing anything
    when the ratio does not suit the router or protection cannot be honoured."""
    t0 = time.perf_counter()
    method = config.prune_method
    src = Resident(model)
    skeleton = build_skeleton(copy.deepcopy(model.config), src.dtype)
    method.target(skeleton, config)  # a ratio the router cannot take fails before the data and the profile
    if profile is not None:
        check_profile_matches(profile, model)
    calib, held_out = _split_data(data, eval_data, tokenizer, config)
    method.check_data(config, calib.num_tokens, calib.source)  # e.g. a task too short: before the profile
    pc = ProfileConfig(num_samples=calib.input_ids.shape[0], seq_len=calib.input_ids.shape[1],
                       batch_size=config.batch_size)
    profile = profile_for(model, profile, tokenizer, calib, pc, progress)
    if not config.protect_super_experts and profile.se_ids():
        log.info("Super-Expert protection is off, as asked (an SE-unaware variant): %d SEs may be affected",
                 len(profile.se_ids()))
    mplan = method.plan(skeleton, config, profile, calib.input_ids if method.needs_calibration else None)
    step = method.step(src, mplan, progress)
    streams = {}
    if held_out is not None:
        chunks = list(held_out.input_ids.split(config.batch_size))
        streams = {"before": Stream(chunks, before=True), "after": Stream(chunks)}
    final = run_pass(src, streams, [step], progress=progress, desc=f"prune ({config.method})")
    ppl = (None, None)
    if held_out is not None:
        ppl = tuple(math.exp(src.mean_loss(final[k], streams[k].chunks)) for k in ("before", "after"))
    return method.result(mplan, step, profile, calib.source, ppl, time.perf_counter() - t0,
                         model_name=str(getattr(model, "name_or_path", "") or type(model).__name__),
                         eval_source=held_out.source if held_out is not None else "",
                         eval_tokens=held_out.num_tokens if held_out is not None else 0)


def save_pruned(model, tokenizer, result: PruneResult, out: str | Path, overwrite: bool = False,
                source: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the pruned model (safetensors), its tokenizer and ``prune_report.json`` atomically to ``out``:
    the ``plain`` export format's writer over the model (:mod:`secompress.quant.formats.plain`).

    Floating tensors are written in ``dtype`` (None: the source checkpoint's own 16-bit dtype, else the
    model's). When its source checkpoint (``source``, default the folder it was loaded from) is
    block-scaled FP8, the result is FP8 too: kept FP8 tensors are copied byte for byte from the source
    and the fp8 quantization_config is kept, not written dequantized (2-4x the size). The report's
    ``export`` says the size written and its ratio to the source.
    """
    from ..quant.formats import FORMATS
    from ..quant.formats.base import resident_dtype, resident_source, write_resident
    from ..quant.formats.plain import fp8_checkpoint

    adapter = check_model(model)
    if adapter.num_experts(model.config) != result.num_experts_after:
        raise SecompressError(f"the model has {adapter.num_experts(model.config)} experts but the result says "
                              f"{result.num_experts_after}: save the model that prune() returned this result for")
    counts = {int(adapter.router_of(adapter.block_of(adapter.layers(model)[l])).weight.shape[0])
              for l in adapter.moe_layer_indices(model)}
    if len(counts) > 1:
        raise SecompressError(f"the MoE layers hold different expert counts {sorted(counts)}: a transformers config "
                              "stores one, so this model cannot be saved as a stock checkpoint (UNCURL's adaptive "
                              "counts are evaluated in memory only)")
    src = Path(source) if source is not None else resident_source(model)
    if fp8_checkpoint(src) is not None and PRUNE_METHODS[result.config.method].changes_weights:
        raise SecompressError(f"'{result.config.method}' writes new weights, which cannot be copied as stored from "
                              "the FP8 source; merging and neuron pruning of FP8 checkpoints are not supported yet")
    dtype = dtype or resident_dtype(model, src)
    with atomic_dir(out, overwrite) as tmp:
        summary = write_resident(FORMATS["plain"], model, tokenizer, None, tmp, dtype, src, kept=result.kept)
        report = result.to_json()
        report["export"] = summary.to_json()
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)
