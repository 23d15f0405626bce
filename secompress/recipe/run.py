"""``secompress run RECIPE``: profile -> prune -> quantize -> evaluate -> export -> push.

Stages pass objects (a model, a ProfileResult, metric dicts), not folders. The only
thing kept between runs is the SE profile, cached under a key made of the model's
identity (hub id + revision, or a local checkpoint's safetensors headers, sizes and
mtimes), the calibration text's hash and the profile settings: any change gives a
new key, so a stale profile is never reused (``secompress.cache``). Everything a run
writes goes to a temporary directory renamed to OUT at the end, so an interrupted run
leaves nothing half-written; re-running starts clean and reuses the cached profile.

OUT/
  model/                 the exported checkpoint (+ README.md model card) = what `push` uploads
  profile/               super_experts.json, expert_stats.csv, plots
  comparison.{json,md,png}   baseline vs SE-aware vs SE-unaware
  manifest.json          what ran, with which versions, how long, peak memory
  recipe.yaml            the recipe as run (overrides applied)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cache import CACHE_ENV, ProfileCache, cache_root, model_fingerprint, profile_key  # noqa: F401 (re-exported)
from ..checkpoints import check_finite_weights
from ..compress import Job, JobPlan, checkpoint_sizes, plan_job, run_job
from ..data import load_calibration
from ..errors import SecompressError, option_style
from ..outputs import atomic_dir, check_output_dir, checkpoint_bytes, export_size
from ..pipeline import Resident, Streamed
from ..profile import ProfileConfig, ProfileResult, profile
from ..profile_io import dead_experts, save_profile
from ..prune.result import REPORT_NAME
from ..quant.apply import needs_profile
from ..quant.backends import exporter
from ..sink import check_sink, save_sink
from ..source import Source
from .evaluation import Comparison, check_tasks, measure_tasks, sink_rows
from .export_eval import check_backend, check_vllm_loads, in_memory_vllm_tasks, streamed_tasks
from .publish import check_push, model_card, push
from .schema import Recipe, check_against_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    manifest: dict
    comparison: Comparison | None = None
    pushed: list[str] = field(default_factory=list)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); the physical memory size where that is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_mode(recipe: Recipe, source) -> tuple[bool, str]:
    """(streamed?, the reason, for the console and the manifest): ``model.streaming`` forces it; otherwise
    streamed when the checkpoint, in the compute dtype, exceeds ``model.memory_share`` of the available memory."""
    m = recipe.model
    if m.streaming is not None:
        return m.streaming, f"model.streaming: {str(m.streaming).lower()}"
    total = checkpoint_sizes(source.checkpoint, source.adapter.layers_path, source.dtype)[3]
    avail = available_memory()
    streamed = total > m.memory_share * avail
    return streamed, (f"the checkpoint takes {total / 2**30:.2f} GiB in {m.dtype}, "
                      f"{'more' if streamed else 'not more'} than model.memory_share {m.memory_share} x "
                      f"{avail / 2**30:.1f} GiB available")


def _profile_config(recipe: Recipe, streamed: bool) -> ProfileConfig:
    """The profile stage's config (from data and model when the recipe has no profile stage: pruning and
    SE protection need one); a streamed run profiles streamed."""
    d = recipe.data
    cfg = recipe.stage("profile") or ProfileConfig(num_samples=d.num_samples, seq_len=d.seq_len,
                                                   batch_size=d.batch_size, dtype=recipe.model.dtype)
    return dataclasses.replace(cfg, streaming=True) if streamed and not cfg.streaming else cfg


def _cached_profile(recipe: Recipe, source, model, tok, calib, progress: bool, streamed: bool
                    ) -> tuple[ProfileResult, bool]:
    cfg = _profile_config(recipe, streamed)
    cache = ProfileCache()
    key = profile_key(recipe.model.id, recipe.model.revision, recipe.model.dtype, calib.sha256, cfg)
    if (hit := cache.get(key)) is not None:
        return hit, True
    result = profile(source if cfg.streaming or model is None else model, tok, data=calib, config=cfg,
                     progress=progress)
    result.model = recipe.model.id
    cache.put(key, result)
    return result, False


def _data(recipe: Recipe, tok):
    d = recipe.data
    if d.eval is None:  # evaluation windows follow the calibration windows of the same text
        both = load_calibration(d.calibration, tok, d.num_samples + d.eval_samples, d.seq_len)
        if both.input_ids.shape[0] < d.num_samples + 1:
            raise SecompressError(f"'{d.calibration}' is too short to hold out evaluation windows: set data.eval")
        calib = dataclasses.replace(both, input_ids=both.input_ids[: d.num_samples])
        return calib, both.input_ids[d.num_samples:]
    return (load_calibration(d.calibration, tok, d.num_samples, d.seq_len),
            load_calibration(d.eval, tok, d.eval_samples, d.seq_len).input_ids)


def _job(recipe: Recipe) -> Job:
    pc = recipe.stage("prune")
    if pc is not None:
        pc = dataclasses.replace(pc, eval_samples=0)  # the evaluate stage measures perplexity in the pass
    return Job(prune=pc, quant=recipe.stage("quantize"), batch_size=recipe.data.batch_size)


def run_recipe(recipe: Recipe, recipe_text: str, out: str | Path, overwrite: bool = False,
               dry_run: bool = False, progress: bool = True, root: str | Path | None = None,
               inputs=(), report: Callable[[str], None] | None = None, announce=None) -> RunResult:
    """Run ``recipe`` into ``out``. ``root``: the folder ``out`` must stay inside (the CLI's ``out/``
    when the folder comes from the recipe's name); ``inputs``: paths the output must not replace
    (the model folder and data files of the recipe are always added); ``report``: called with one
    line as each stage starts and ends (the CLI prints them; default: the log); ``announce``: called
    with the plan (in memory or streamed, device, estimated peak memory) before any compute."""
    d = recipe.data
    inputs = (*inputs, recipe.model.id if Path(recipe.model.id).exists() else None,
              *(p for p in (d.calibration, d.eval) if p and Path(p).exists()))
    # fail before any compute: the destination, its free space (a rough estimate: an export can be
    # ~1.5x the checkpoint, RTN's dequantized weights plus codes), the push credentials, and
    # recipe values the checkpoint's config refutes (before any weight is read)
    need = int(1.5 * checkpoint_bytes(recipe.model.id)) if recipe.stage("export") is not None else 0
    out = check_output_dir(out, overwrite, inputs=inputs, root=root, need_bytes=need)
    check_against_checkpoint(recipe)
    check_backend(recipe)  # evaluate.backend vllm: installed, a GPU, an export to evaluate
    check_tasks(recipe)  # every lm-eval task name exists
    if (st := recipe.stage("push")) is not None:
        check_push(st, dry_run)
    report = report or log.info
    with option_style("recipe"):  # advice names recipe keys
        return _run(recipe, recipe_text, out, overwrite, dry_run, progress, Stages(report), announce or report)


class Stages:
    """Times the stages of a run and reports each start and end as it happens."""

    def __init__(self, report: Callable[[str], None]):
        self.report, self.timings = report, {}

    @contextmanager
    def __call__(self, name: str, what: str = ""):
        self.report(f"[{len(self.timings) + 1}] {name}{': ' + what if what else ''} ...")
        t = time.time()
        yield
        self.timings[name] = round(time.time() - t, 2)
        self.report(f"    {name} done in {self.timings[name]:.1f} s")


def _run(recipe: Recipe, recipe_text: str, out: Path, overwrite: bool, dry_run: bool, progress: bool,
         stage: Stages, announce) -> RunResult:
    m = recipe.model
    t0 = time.time()
    source = Source.open(m.id, m.revision, m.trust_remote_code, m.dtype, m.device)
    streamed, reason = choose_mode(recipe, source)
    ev = recipe.stage("evaluate")
    job = _job(recipe)
    resident_tasks = bool(ev and ev.tasks and ev.backend == "hf" and not streamed)
    model = None
    with stage("load", f"{m.id} ({m.dtype}) {'and the data' if streamed else 'in memory, and the data'}"):
        tok = source.tokenizer()
        calib, eval_ids = _data(recipe, tok)
        if job.prune is not None:  # e.g. a task too short for a task method: before the model or the profile
            job.prune.prune_method.check_data(job.prune, calib.num_tokens, calib.source)
        if not streamed:
            model = source.load()
            check_finite_weights(model, m.id)  # NaN weights: named here, not by a failed evaluation
    baseline_tasks: dict = {}
    if resident_tasks:
        with stage("evaluate_baseline", "lm-eval tasks on the uncompressed model"):
            baseline_tasks = measure_tasks(model, tok, ev, "baseline")
    prof, cache_hit = None, False
    if recipe.stage("profile") is not None or job.prune is not None or \
            (job.quant is not None and needs_profile(job.quant)):
        with stage("profile", "Super Experts"):
            prof, cache_hit = _cached_profile(recipe, source, model, tok, calib, progress, streamed)
        dead, evidence = dead_experts(prof), prof.evidence()  # not `ev`: that is the evaluate stage
        stage.report(f"    Super Experts: {prof.se_ids() or 'none'} (profile cache {'hit' if cache_hit else 'miss'}); "
                     f"{len(dead)} dead experts (no calibration token)" + (", listed in profile/super_experts.json"
                                                                           if dead else ""))
        stage.report(f"    evidence: {evidence.why}")
        if evidence.weak:
            log.warning("Super Experts: %s", evidence.why)
    plan = plan_job(source, job, prof, calib=calib.input_ids)
    check_vllm_loads(recipe, plan.report())  # export_eval: an export vLLM cannot load fails now
    compare = bool(ev and ev.compare_se_unaware and prof is not None and (job.prune or job.quant))
    plan_u = plan_job(source, job, prof, protect=False, calib=calib.input_ids) if compare else None
    windows = eval_ids if ev is not None else None  # the evaluation windows, through every pass
    announce(f"{plan.describe(*(windows.shape if windows is not None else (0, 0)), streamed=streamed)} ({reason})")
    unaware_model = copy.deepcopy(model) if compare and not streamed else None
    export = recipe.stage("export") is not None
    notes: list[str] = []
    with atomic_dir(out, overwrite) as tmp:  # a failed gate below removes it, the export inside included
        dest = tmp / "model"
        what = " + ".join(n for n in ("prune", "quantize", "export") if recipe.stage(n)) or "evaluation only"
        with stage("compress", what):
            res = run_job(plan, Streamed(source) if streamed else Resident(model), windows, dest if export else None,
                          tok, progress=progress, sink=ev is not None)
        sinks = {"baseline": res.sink_before, "SE-aware": res.sink_after} if ev is not None else {}
        if ev is not None and ev.sink_check is not None:  # before the SE-unaware pass: a lost sink fails now
            check_sink(sinks["baseline"], sinks["SE-aware"], ev.sink_check, "SE-aware")
        comparison = res_u = None
        if ev is not None:
            with stage("evaluate", "SE-aware" + (" and the SE-unaware comparison variant (the same recipe with "
                                                  "Super-Expert protection off)" if compare else "")):
                comparison, res_u = _evaluate(recipe, ev, res, plan_u, source, streamed, model, unaware_model, tok,
                                              windows, baseline_tasks, sinks, progress, dest if export else None, notes)
        pr = res.prune_result(prof, calib.source, model_name=m.id) if job.prune is not None else None
        write_run_files(tmp, recipe_text, prof, comparison)
        if sinks:
            save_sink(sinks, tmp)
        size = export_size(dest, source.nbytes) if export else None
        effect = comparison.se_effect(_touched(plan, plan_u, res_u)) if comparison is not None else None
        if effect:
            stage.report(f"    SE effect: {effect}")
        if size:
            stage.report(f"    export: {size['bytes'] / 2**20:.1f} MiB, {size['ratio']:.2f}x the checkpoint's "
                         f"{size['source_bytes'] / 2**20:.1f} MiB")
        if export:
            _card(recipe, recipe_text, plan, pr, prof, comparison, dest, size, effect)
        manifest = _manifest(recipe, prof, cache_hit, stage.timings, {"prune": pr} if pr else {})
        manifest.update(mode="streamed" if streamed else "in memory", mode_reason=reason, device=str(source.device),
                        notes=notes, export=size, se_effect=effect, plan={"checkpoint_bytes": plan.checkpoint_bytes,
                                           "largest_layer_bytes": plan.layer_bytes,
                                           "embeddings_head_bytes": plan.rest_bytes, "output_bytes": plan.output_bytes,
                                           "estimated_peak_bytes": plan.peak_bytes(*(windows.shape if windows
                                                                                     is not None else (0, 0)))})
        manifest["wall_seconds"] = round(time.time() - t0, 2)
        manifest["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return RunResult(Path(out), manifest, comparison, finish_push(recipe, out, manifest, dry_run, stage))


def _evaluate(recipe, ev, res, plan_u, source, streamed: bool, model, unaware_model, tok, windows, baseline_tasks,
              sinks, progress, dest, notes):
    """The comparison table: perplexity and sink health from the passes, lm-eval tasks on the models in
    memory or on the export (streamed), the SE-unaware variant as one more pass; returns (the comparison,
    the SE-unaware pass's result or None)."""
    rows = {"perplexity": res.perplexity_before} if ev.perplexity else {}
    aware = {"perplexity": res.perplexity_after} if ev.perplexity else {}
    rows.update(baseline_tasks)
    if baseline_tasks:
        aware.update(measure_tasks(model, tok, ev, "SE-aware"))
    unaware = r_u = None
    if plan_u is not None:
        src_u = Streamed(source) if streamed else Resident(unaware_model)
        r_u = run_job(plan_u, src_u, windows, None, tok, baseline=False, progress=progress, sink=True)
        unaware = {"perplexity": r_u.perplexity_after} if ev.perplexity else {}
        if baseline_tasks:
            unaware.update(measure_tasks(unaware_model, tok, ev, "SE-unaware"))
        unaware.update(sink_rows(r_u.sink_after))
        sinks["SE-unaware"] = r_u.sink_after
    rows.update(sink_rows(sinks["baseline"]))
    aware.update(sink_rows(sinks["SE-aware"]))
    comparison = Comparison.build(rows, aware, unaware)
    if ev.tasks and ev.backend == "vllm" and not streamed and dest is not None:
        notes.extend(in_memory_vllm_tasks(recipe, model, tok, dest, comparison))
    elif ev.tasks and streamed:
        streamed_tasks(recipe, dest, tok, source.dtype, comparison, notes)
    comparison.check(ev.recovery_threshold)
    return comparison, r_u


def write_run_files(folder: Path, recipe_text: str, prof, comparison) -> None:
    """What every run writes beside the model: the recipe as run, the profile and the comparison."""
    (folder / "recipe.yaml").write_text(recipe_text)
    if prof is not None:
        save_profile(prof, folder / "profile")
    if comparison is not None:
        comparison.save(folder)


def finish_push(recipe: Recipe, out: Path, manifest: dict, dry_run: bool, stage: Stages | None = None) -> list[str]:
    """The push stage, after the output is in place (a failed upload keeps the export)."""
    stage = stage or Stages(log.info)
    pushed: list[str] = []
    if (st := recipe.stage("push")) is not None:  # after the rename: a failed upload keeps the export
        with stage("push", f"{'listing what would go to' if dry_run else 'uploading to'} {st.repo_id}"):
            pushed = push(Path(out) / "model", st, dry_run)
        manifest["push"] = {"repo_id": st.repo_id, "dry_run": dry_run, "files": pushed}
        (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return pushed


PLAIN_SNIPPET = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained('PATH')"


def _touched(plan: JobPlan, plan_u: JobPlan | None, res_u) -> list[str]:
    """What the SE-unaware variant did to the Super Experts that the SE-aware one did not."""
    if plan_u is None or res_u is None:
        return []
    out = []
    pr = res_u.prune_result(plan_u.profile, "")
    if pr is not None and pr.removed_super_experts:
        out.append(f"{pr.touched_what.lower()} Super Experts {pr.removed_super_experts}")
    qa, qu = plan.quant_plan, plan_u.quant_plan
    if qa is not None and qu is not None:
        lower = sorted({qu.units[n].layer for n in qu.bits if n in qa.bits and (qu.bits[n] or 16) < (qa.bits[n] or 16)})
        if lower:
            widths = sorted({qu.bits[n] for n in qu.bits if qu.units[n].layer in lower and qu.bits[n]})
            out.append(f"quantized the Super-Expert layer{'s' if len(lower) > 1 else ''} {lower} to "
                       f"{'/'.join(map(str, widths))} bits")
    return out


def _card(recipe, recipe_text, plan: JobPlan, pr, prof, comparison, dest: Path, size=None, effect=None) -> None:
    """The export's prune report and model card (written once the comparison is complete)."""
    if pr is not None:
        (dest / REPORT_NAME).write_text(json.dumps(pr.to_json(), indent=1))
    prune_info = None if pr is None else {"method": pr.config.method, "num_experts_after": pr.num_experts_after,
                                          "removed_per_layer": pr.num_experts_before - pr.num_experts_after,
                                          "kept": pr.kept}
    qp = plan.quant_plan
    snippet = exporter(qp.meta).load_snippet if qp is not None else PLAIN_SNIPPET
    ses = prof.se_ids() if prof is not None else []
    (dest / "README.md").write_text(model_card(recipe, recipe_text, ses, comparison,
                                               qp.table() if qp is not None else None, prune_info, snippet, size,
                                               effect, prof.evidence().why if prof is not None else None))


def _manifest(recipe: Recipe, prof, cache_hit: bool, timings: dict, info: dict) -> dict:
    import transformers

    from .. import __version__

    return {
        "recipe": recipe.name, "recipe_source": recipe.source, "stages": recipe.stage_names,
        "model": asdict(recipe.model), "data": asdict(recipe.data),
        "versions": {"secompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "profile_cache_hit": cache_hit,
        "super_experts": [list(s) for s in prof.se_ids()] if prof is not None else [],
        "super_expert_evidence": prof.evidence().to_json() if prof is not None else None,
        "timings_s": timings,
    }
