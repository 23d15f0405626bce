"""The pruning stage: remove a share of every MoE layer's routed experts, sparing Super Experts.

    result = prune(model, tokenizer, PruneConfig(ratio=0.25, method="reap"))
    save_pruned(model, tokenizer, result, "out/")

Steps: validate the ratio against the router (:class:`~secompress.prune.select.PrunePlan`);
profile the model unless a profile is given (its statistics feed the scorers, and
its Super Experts, Su et al. 2025 arXiv 2507.23279, are protected); choose the
experts per layer by a registered score or by NAEE reconstruction, or merge them (M-SMoE,
HC-SMoE: ``.merging``), or prune every expert's intermediate neurons (HEAPr: ``.neurons``);
measure held-out perplexity; change the model for real; measure again.

``ratio`` is the share of each MoE layer's routed experts removed (pruning) or merged away
(merging), and for HEAPr the share of every expert's intermediate width removed.
Legend: L decoder layers, E routed experts, N windows, S sequence length.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import CalibrationData, load_calibration
from ..errors import SecompressError
from ..perplexity import perplexity
from ..checkpoints import check_model, write_legacy_config_keys
from ..outputs import atomic_dir
from ..streaming import Checkpoint
from .as_stored import save_as_stored
from ..profile import (DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, ProfileConfig, ProfileResult,
                       check_profile_matches, profile_for)
from .reconstruction import DEFAULT_LIMIT, capture_block_inputs, naee_select
from .scores import SCORERS, score
from .select import PrunePlan, ProtectionChange, Selection, make_plan, protected_by_layer, select_by_score
from .structural import RemovalReport, SizeDelta, model_size, remove_experts, shared_multiplier_for
from .merging import MERGE_METHODS, merge_targets
from .merge import check_groups
from .heapr import HESSIANS
from .seeds import NEW_WEIGHTS, SEED_METHODS
from .stun_math import PATTERNS, SIMILARITIES
from .uncurl import COUNTS

log = logging.getLogger(__name__)
REPORT_NAME = "prune_report.json"
RECONSTRUCTION_METHODS = ("naee",)
NEURON_METHODS = ("heapr",)
REPORT_VERSION = 1


ALL_METHODS = (*sorted(SCORERS), *RECONSTRUCTION_METHODS, *MERGE_METHODS, *NEURON_METHODS, *SEED_METHODS)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float  # share of each MoE layer's routed experts to remove, in (0, 1)
    method: str = "reap"  # a SCORERS name, "naee", a merge method (m-smoe, hc-smoe) or "heapr"
    protect_super_experts: bool = True
    seed: int = 0  # the random scorer's seed
    calib_samples: int = DEFAULT_NUM_SAMPLES  # windows for profiling and NAEE
    eval_samples: int = 8  # held-out windows for perplexity; 0 = no perplexity
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    naee_samples: int = 4  # of the calibration windows, how many NAEE reconstructs (its inputs are kept in memory)
    naee_limit: int = DEFAULT_LIMIT  # enumerate removal sets up to this many per layer, else greedy
    hessian: str = "fisher"  # HEAPr: output-space Hessian from gradients ("fisher") or "identity" (no backward)
    task_min_tokens: int = 2048  # premoe, uncurl: fewest calibration tokens the task data must give
    tcess_top_k: int = 0  # premoe: router logits per token that count in TCESS (0: the model's top_k)
    tcess_threshold: float = 0.0  # premoe: a selection counts if its softmax among the top-k is >= this
    uncurl_counts: str = "uniform"  # uncurl: one count per layer (exportable) or "adaptive" (in memory only)
    dern_threshold: float = 0.3  # dern: a neuron segment less similar (cosine) to every kept neuron is left out
    stun_sparsity: float = 0.5  # stun: share of each kept expert's weights zeroed in stage 2 (0: stage 1 only)
    stun_pattern: str = "2:4"  # stun: "2:4" or "unstructured"
    stun_similarity: str = "router"  # stun: behaviour distance from router rows, or "coact" (co-selection counts)

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must be in (0, 1) (the share of routed experts to remove), got {self.ratio}")
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method '{self.method}'; known: {', '.join(ALL_METHODS)}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got '{self.hessian}'")
        if self.calib_samples < 1 or self.eval_samples < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("calib_samples and batch_size must be >= 1, eval_samples >= 0, seq_len >= 2")
        if self.naee_samples < 1 or self.naee_limit < 1:
            raise ValueError("naee_samples and naee_limit must be >= 1")
        if self.task_min_tokens < 1 or self.tcess_top_k < 0 or not 0.0 <= self.tcess_threshold <= 1.0:
            raise ValueError("task_min_tokens must be >= 1, tcess_top_k >= 0 and tcess_threshold in [0, 1]")
        if self.uncurl_counts not in COUNTS or self.stun_pattern not in PATTERNS or \
                self.stun_similarity not in SIMILARITIES:
            raise ValueError(f"uncurl_counts must be one of {COUNTS}, stun_pattern one of {PATTERNS} and "
                             f"stun_similarity one of {SIMILARITIES}")
        if not 0.0 <= self.stun_sparsity < 1.0 or not -1.0 <= self.dern_threshold <= 1.0:
            raise ValueError("stun_sparsity must be in [0, 1) and dern_threshold (a cosine) in [-1, 1]")


@dataclass
class PruneResult(SizeDelta):
    config: PruneConfig
    model: str
    model_type: str
    num_experts_before: int
    num_experts_after: int
    moe_layers: list[int]
    kept: dict[int, list[int]]  # layer -> original ids of the kept experts (new id = position)
    removed: dict[int, list[int]]
    super_experts: list[tuple[int, int | str]]  # from the profile (absolute rule)
    removed_super_experts: list[tuple[int, int]]  # only non-empty with protection off
    protection_changes: list[ProtectionChange]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    perplexity_before: float | None
    perplexity_after: float | None
    data_source: str
    eval_source: str
    eval_tokens: int
    profile_source: str
    seconds: float
    extra: dict = field(default_factory=dict)  # method-specific details (NAEE losses)

    def to_json(self) -> dict:
        return {
            "report_version": REPORT_VERSION, "model": self.model, "model_type": self.model_type,
            "config": asdict(self.config),
            "num_experts_before": self.num_experts_before, "num_experts_after": self.num_experts_after,
            "layers": [{"layer": l, "kept": self.kept[l], "removed": self.removed[l]} for l in self.moe_layers],
            "super_experts": [{"layer": l, "expert": e} for l, e in self.super_experts],
            "removed_super_experts": [{"layer": l, "expert": e} for l, e in self.removed_super_experts],
            "protection_changes": [c.to_json() for c in self.protection_changes],
            "parameters": {"before": self.params_before, "after": self.params_after, "saved": self.params_saved},
            "bytes": {"before": self.bytes_before, "after": self.bytes_after, "saved": self.bytes_saved},
            "perplexity": {"before": self.perplexity_before, "after": self.perplexity_after,
                           "eval_source": self.eval_source, "eval_tokens": self.eval_tokens},
            "calibration": {"data": self.data_source, "profile": self.profile_source},
            "seconds": round(self.seconds, 2),
            **({"details": self.extra} if self.extra else {}),
        }


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


def width_for(model, ratio: float) -> int:
    """HEAPr: the intermediate width every expert keeps at ``ratio`` (a clear ValueError if none is left)."""
    adapter = check_model(model)
    I = adapter.intermediate_size(model.config)
    width = I - int(math.floor(ratio * I + 0.5))
    if not 0.0 < ratio < 1.0 or width < 1 or width >= I:
        raise ValueError(f"ratio {ratio} of an expert width of {I} neurons keeps {width}: the kept width must be "
                         f"in 1..{I - 1}")
    shared_multiplier_for(adapter, model.config, width)  # a shared expert the config ties to the width
    return width


def plan_for(model, ratio: float, method: str = "reap") -> PrunePlan | int:
    """The validated plan for pruning ``model`` by ``ratio`` (raises a clear ValueError otherwise);
    for a neuron method, the kept width."""
    if method in NEURON_METHODS:
        return width_for(model, ratio)
    adapter = check_model(model)
    groups = tuple(getattr(model.config, k, None) for k in adapter.group_keys) if adapter.group_keys else None
    return make_plan(ratio, adapter.num_experts(model.config), adapter.top_k(model.config), groups,
                     adapter.min_experts_per_group)


def prune(model, tokenizer, config: PruneConfig, profile: ProfileResult | None = None,
          data: str | Path | CalibrationData = "builtin", eval_data: str | Path | CalibrationData | None = None,
          progress: bool = False) -> PruneResult:
    """Remove ``config.ratio`` of the routed experts of every MoE layer of ``model`` in place.

    Raises (before changing anything) when the ratio does not suit the router or when
    protection cannot be honoured. Held-out perplexity comes from the windows after
    the calibration windows of ``data``, or from ``eval_data``.
    """
    t0 = time.perf_counter()
    adapter = check_model(model)
    plan = plan_for(model, config.ratio, config.method)
    if profile is not None:
        check_profile_matches(profile, model)
    calib, held_out = _split_data(data, eval_data, tokenizer, config)
    if config.method in SEED_METHODS:  # task data, widths, 2:4 shapes: before profiling
        from .seeds import check_seed

        check_seed(model, adapter, plan, calib.num_tokens, calib.source, (), config)
    pc = ProfileConfig(num_samples=calib.input_ids.shape[0], seq_len=calib.input_ids.shape[1],
                       batch_size=config.batch_size)
    profile = profile_for(model, profile, tokenizer, calib, pc, progress)
    moe_layers = adapter.moe_layer_indices(model)
    ses = profile.se_ids()
    protect = config.protect_super_experts
    if not protect and ses:
        log.info("Super-Expert protection is off, as asked (an SE-unaware variant): %d SEs may be removed", len(ses))

    if config.method in MERGE_METHODS or config.method in NEURON_METHODS:
        return _restructure(model, adapter, plan, calib, held_out, profile, config, t0, progress)
    if config.method in SEED_METHODS:
        return _seed(model, adapter, plan, calib, held_out, profile, config, t0, progress)
    extra: dict = {}
    if config.method in SCORERS:
        selection = score_selection(plan, moe_layers, config, profile)
    else:
        for layer in moe_layers:  # fail before any compute
            if protect:
                plan.check_protection(layer, protected_by_layer(ses).get(layer, ()))
        selection, choices = _naee(model, adapter, plan, calib, ses, protect, config)
        extra = {"naee": {str(l): {"loss": c.loss, "exhaustive": c.exhaustive} for l, c in choices.items()}}

    ppl_before = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    rep: RemovalReport = remove_experts(model, adapter, selection.removed)
    ppl_after = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    return build_result(config, model, rep, selection, profile, moe_layers, calib.source, held_out,
                        (ppl_before, ppl_after), time.perf_counter() - t0, extra)


def score_selection(plan: PrunePlan, moe_layers: list[int], config: PruneConfig, profile: ProfileResult
                    ) -> Selection:
    """The experts a registered score removes, from the profile's statistics (SEs spared unless told)."""
    E = plan.num_experts
    stats = {k: v[:, :E] for k, v in profile.arrays.items() if np.ndim(v) == 2}  # [L, E]
    return select_by_score(score(config.method, stats, config.seed), plan, moe_layers, profile.se_ids(),
                           config.protect_super_experts)


def build_result(config: PruneConfig, model, rep: RemovalReport, selection: Selection, profile: ProfileResult,
                 moe_layers: list[int], data_source: str, held_out: CalibrationData | None,
                 ppl: tuple[float | None, float | None], seconds: float, extra: dict | None = None) -> PruneResult:
    """The :class:`PruneResult` of a removal (in memory or streamed)."""
    ses = profile.se_ids()
    routed_ses = protected_by_layer(ses)
    removed_ses = sorted((l, e) for l, v in selection.removed.items() for e in v if e in routed_ses.get(l, ()))
    return PruneResult(
        config=config, model=str(getattr(model, "name_or_path", "") or type(model).__name__),
        model_type=model.config.model_type, num_experts_before=rep.num_experts_before,
        num_experts_after=rep.num_experts_after,
        moe_layers=moe_layers, kept=rep.kept, removed=rep.removed, super_experts=ses,
        removed_super_experts=removed_ses, protection_changes=selection.protection_changes,
        params_before=rep.params_before, params_after=rep.params_after, bytes_before=rep.bytes_before,
        bytes_after=rep.bytes_after, perplexity_before=ppl[0], perplexity_after=ppl[1],
        data_source=data_source, eval_source=held_out.source if held_out is not None else "",
        eval_tokens=held_out.num_tokens if held_out is not None else 0,
        profile_source=f"{profile.data_source} ({profile.num_tokens} tokens)",
        seconds=seconds, extra=extra or {})


def _restructure(model, adapter, plan, calib: CalibrationData, held_out, profile: ProfileResult,
                 config: PruneConfig, t0: float, progress: bool) -> PruneResult:
    """Merging (M-SMoE, HC-SMoE) or HEAPr neuron pruning over every MoE layer, in memory."""
    from .layer_stats import collect
    from .merging import merge_model, merged_super_experts
    from .neurons import heapr_model

    E = adapter.num_experts(model.config)
    moe_layers = adapter.moe_layer_indices(model)
    ses = profile.se_ids()
    protect = config.protect_super_experts
    routed = protected_by_layer(ses)
    if config.method in MERGE_METHODS and protect:
        for layer in moe_layers:  # refuse before any compute
            check_groups(merge_targets(plan), plan.groups(), routed.get(layer, set()), f"layer {layer}: ")
    se_channels = {l: {e: int(profile.arrays["out_channel"][l, e]) for e in es} for l, es in routed.items()}
    want = MERGE_METHODS[config.method][0] if config.method in MERGE_METHODS else ("heapr",)
    stats = collect(model, adapter, calib.input_ids, config.batch_size, want,
                    track=se_channels if config.method in NEURON_METHODS else None, hessian=config.hessian,
                    progress=progress)
    ppl_before = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    sizes = model_size(model)
    I = adapter.intermediate_size(model.config)
    if config.method in MERGE_METHODS:
        decisions = merge_model(model, adapter, stats, plan, config.method, ses, protect)
        touched = merged_super_experts(decisions, ses)
    else:
        decisions, touched = heapr_model(model, adapter, stats, plan, se_channels, protect)
    ppl_after = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    return restructure_result(config, model, E, moe_layers, decisions, touched, (*sizes, *model_size(model)),
                              profile, calib.source, held_out, (ppl_before, ppl_after), time.perf_counter() - t0, I)


def restructure_result(config: PruneConfig, model, E: int, moe_layers: list[int], decisions: dict, touched: list,
                       sizes: tuple[int, int, int, int], profile: ProfileResult, data_source: str, held_out,
                       ppl: tuple[float | None, float | None], seconds: float, width_before: int | None = None
                       ) -> PruneResult:
    """The :class:`PruneResult` of merging or HEAPr (in memory or streamed). ``model``: the result
    (its config has the final expert count / width); ``decisions``: {layer: MergeDecision or
    NeuronDecision}; ``touched``: SEs merged or missing massive neurons; ``sizes``: (parameters,
    bytes) before, then after; ``width_before``: HEAPr's expert width before."""
    adapter = check_model(model)
    if config.method in MERGE_METHODS:
        kept = {l: d.representatives for l, d in decisions.items()}
        extra = {"merge": {"method": config.method, "groups": {str(l): d.to_json() for l, d in decisions.items()},
                           "router": "each group keeps its representative's router row (first id of the group)"}}
    else:
        kept = {l: list(range(E)) for l in moe_layers}
        extra = {"heapr": {"hessian": config.hessian, "intermediate_size_before": width_before,
                           "intermediate_size_after": adapter.intermediate_size(model.config),
                           "layers": {str(l): d.to_json() for l, d in decisions.items()},
                           "super_experts_missing_massive_neurons": [list(t) for t in touched]}}
    return PruneResult(
        config=config, model=str(getattr(model, "name_or_path", "") or type(model).__name__),
        model_type=model.config.model_type, num_experts_before=E, num_experts_after=adapter.num_experts(model.config),
        moe_layers=moe_layers, kept=kept, removed={l: [e for e in range(E) if e not in kept[l]] for l in moe_layers},
        super_experts=profile.se_ids(), removed_super_experts=touched, protection_changes=[],
        params_before=sizes[0], params_after=sizes[2], bytes_before=sizes[1], bytes_after=sizes[3],
        perplexity_before=ppl[0], perplexity_after=ppl[1], data_source=data_source,
        eval_source=held_out.source if held_out is not None else "",
        eval_tokens=held_out.num_tokens if held_out is not None else 0,
        profile_source=f"{profile.data_source} ({profile.num_tokens} tokens)",
        seconds=seconds, extra=extra)


def _seed(model, adapter, plan, calib: CalibrationData, held_out, profile: ProfileResult, config: PruneConfig,
          t0: float, progress: bool) -> PruneResult:
    """PreMoe, UNCURL, DERN or STUN over every MoE layer, in memory (``.seeds``)."""
    from .seeds import check_seed, run_seed

    E, moe_layers, ses = adapter.num_experts(model.config), adapter.moe_layer_indices(model), profile.se_ids()
    check_seed(model, adapter, plan, calib.num_tokens, calib.source, ses, config)
    ppl_before = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    sizes = model_size(model)
    out = run_seed(model, adapter, plan, calib.input_ids, ses, config, progress)
    ppl_after = perplexity(model, held_out.input_ids, config.batch_size) if held_out is not None else None
    after = model_size(model)
    return PruneResult(
        config=config, model=str(getattr(model, "name_or_path", "") or type(model).__name__),
        model_type=model.config.model_type, num_experts_before=E, num_experts_after=adapter.num_experts(model.config),
        moe_layers=moe_layers, kept=out.kept, removed={l: [e for e in range(E) if e not in out.kept[l]] for l in moe_layers},
        super_experts=ses, removed_super_experts=out.touched, protection_changes=[],
        params_before=sizes[0], params_after=after[0], bytes_before=sizes[1], bytes_after=after[1],
        perplexity_before=ppl_before, perplexity_after=ppl_after, data_source=calib.source,
        eval_source=held_out.source if held_out is not None else "",
        eval_tokens=held_out.num_tokens if held_out is not None else 0,
        profile_source=f"{profile.data_source} ({profile.num_tokens} tokens)", seconds=time.perf_counter() - t0,
        extra=out.extra)


@torch.no_grad()
def _naee(model, adapter, plan: PrunePlan, calib: CalibrationData, ses, protect: bool, cfg: PruneConfig
          ) -> tuple[Selection, dict]:
    ids = calib.input_ids[: cfg.naee_samples]  # [N, S]
    base = model.get_submodule(adapter.layers_path.rpartition(".")[0])
    layers = adapter.moe_layer_indices(model)
    with capture_block_inputs(model, adapter, layers) as inputs:
        for chunk in ids.split(cfg.batch_size):
            base(input_ids=chunk.to(model.device), use_cache=False)
    return naee_select(model, adapter, plan, inputs, ses, protect, cfg.naee_limit)


def remap_profile(p: ProfileResult, r: PruneResult) -> ProfileResult:
    """The profile as seen by the pruned model: kept experts' columns in their new order,
    the shared-expert column last, Super Experts renumbered (removed ones dropped)."""
    import dataclasses

    E, E2 = p.num_experts, r.num_experts_after
    cols = {l: list(r.kept[l]) + [E] for l in r.kept}  # old column of each new column
    arrays = {}
    for k, v in p.arrays.items():
        if np.ndim(v) != 2:
            arrays[k] = v
            continue
        new = v[:, : E2 + 1].copy()  # dense layers keep their fill values
        for l, c in cols.items():
            new[l] = v[l, c]
        arrays[k] = new

    def renumber(ses):
        return [(l, E2 if c == E else cols[l].index(c)) for l, c in ses if l in cols and c in cols[l]]

    return dataclasses.replace(p, num_experts=E2, arrays=arrays, super_experts=renumber(p.super_experts),
                               super_experts_normalised=renumber(p.super_experts_normalised))


def save_pruned(model, tokenizer, result: PruneResult, out: str | Path, overwrite: bool = False,
                source: str | Path | None = None) -> Path:
    """Write the pruned model (safetensors), its tokenizer and ``prune_report.json`` atomically to ``out``.

    The model is written in its dtype. When its source checkpoint (``source``, default the folder
    it was loaded from) is block-scaled FP8, the result is FP8 too: kept FP8 tensors are copied
    byte for byte from the source and the fp8 quantization_config is kept (see
    :mod:`secompress.prune.as_stored`), not written dequantized (2-4x the size).
    """
    adapter = check_model(model)
    if adapter.num_experts(model.config) != result.num_experts_after:
        raise SecompressError(f"the model has {adapter.num_experts(model.config)} experts but the result says "
                              f"{result.num_experts_after}: save the model that prune() returned this result for")
    src = _fp8_source(source or getattr(model, "name_or_path", None))
    counts = {int(adapter.router_of(adapter.block_of(adapter.layers(model)[l])).weight.shape[0])
              for l in adapter.moe_layer_indices(model)}
    if len(counts) > 1:
        raise SecompressError(f"the MoE layers hold different expert counts {sorted(counts)}: a transformers config "
                              "stores one, so this model cannot be saved as a stock checkpoint (UNCURL adaptive "
                              "counts: evaluate in memory, export with uncurl_counts='uniform')")
    if src is not None and result.config.method in (*MERGE_METHODS, *NEURON_METHODS, *NEW_WEIGHTS):
        raise SecompressError(f"'{result.config.method}' writes new weights, which cannot be copied as stored from "
                              "the FP8 source; merging and neuron pruning of FP8 checkpoints are not supported yet")
    with atomic_dir(out, overwrite) as tmp:
        if src is not None:
            save_as_stored(model, adapter, src, result.kept, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_legacy_config_keys(tmp / "config.json", model.config, adapter)
        (tmp / REPORT_NAME).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return Path(out)


def _fp8_source(path) -> "Checkpoint | None":
    """The block-scaled FP8 checkpoint at ``path``, or None (no folder, or not FP8)."""
    if not path or not Path(path).is_dir() or not any(Path(path).glob("*.safetensors")):
        return None
    ckpt = Checkpoint(path)
    return ckpt if ckpt.fp8 is not None else None


def summary_table(r: PruneResult) -> str:
    """A plain-text table for the console."""
    prot = "on" if r.config.protect_super_experts else "OFF"
    rows = [f"model {r.model} ({r.model_type}): method {r.config.method}, ratio {r.config.ratio}, "
            f"SE protection {prot}",
            f"experts per MoE layer {r.num_experts_before} -> {r.num_experts_after}; parameters "
            f"{r.params_before:,} -> {r.params_after:,} (saved {r.params_saved:,}, {r.bytes_saved / 2**20:.1f} MiB)",
            f"{'layer':>5}  {'removed':<28}{'SEs':<12}protection changes"]
    if "heapr" in r.extra:
        h = r.extra["heapr"]
        rows.append(f"expert FFN width {h['intermediate_size_before']} -> {h['intermediate_size_after']} "
                    f"(HEAPr, {h['hessian']} Hessian)")
    if "merge" in r.extra:
        rows.append("merge groups (representative first): " + "; ".join(
            f"layer {l}: {g}" for l, g in r.extra["merge"]["groups"].items()))
    ses = protected_by_layer(r.super_experts)
    changes = {c.layer: c for c in r.protection_changes}
    for l in r.moe_layers:
        c = changes.get(l)
        ch = f"spared {list(c.spared)}, removed {list(c.removed_instead)} instead" if c else ""
        rows.append(f"{l:>5}  {str(r.removed[l]):<28}{str(sorted(ses.get(l, ()))):<12}{ch}")
    if r.removed_super_experts:
        what = "REMOVED" if not r.extra else "MERGED or DAMAGED"
        rows.append(f"{what} Super Experts: {r.removed_super_experts}")
    if r.perplexity_before is not None:
        rows.append(f"held-out perplexity {r.perplexity_before:.3f} -> {r.perplexity_after:.3f} "
                    f"({r.eval_tokens} tokens of {r.eval_source})")
    return "\n".join(rows)
