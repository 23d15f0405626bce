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

from ..data import load_calibration
from ..errors import SecompressError
from ..checkpoints import check_finite_weights, load_model, load_tokenizer
from ..cache import CACHE_ENV, ProfileCache, cache_root, model_fingerprint, profile_key  # noqa: F401 (re-exported)
from ..errors import option_style
from ..outputs import atomic_dir, check_output_dir, checkpoint_bytes, temp_dir
from ..profile import ProfileResult, profile
from ..profile_io import dead_experts, save_profile
from .evaluation import Comparison, measure, measure_sink_rows
from .export_eval import check_backend, check_vllm_loads, in_memory_vllm_tasks, plan_report
from .publish import check_push, model_card, push
from .schema import Recipe, check_against_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    manifest: dict
    comparison: Comparison | None = None
    pushed: list[str] = field(default_factory=list)


def _cached_profile(recipe: Recipe, model, tok, calib, progress: bool, streaming: bool = False,
                    device: str = "cpu") -> tuple[ProfileResult, bool]:
    cfg = recipe.stage("profile")  # a ProfileConfig (calibration sizes and dtype from data / model)
    if streaming and not cfg.streaming:
        cfg = dataclasses.replace(cfg, streaming=True)
    cache = ProfileCache()
    key = profile_key(recipe.model.id, recipe.model.revision, recipe.model.dtype, calib.sha256, cfg)
    if (hit := cache.get(key)) is not None:
        return hit, True
    src = recipe.model.id if cfg.streaming else model
    result = profile(src, tok, data=calib, config=cfg, revision=recipe.model.revision,
                     trust_remote_code=recipe.model.trust_remote_code, progress=progress, device=device)
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


def _compress(recipe: Recipe, model, tok, prof: ProfileResult | None, calib, protect: bool, work: Path) -> dict:
    """Apply the prune and quantize stages in place; returns their results. The recipe's stages
    are the API's configs (``PruneConfig``, ``QuantConfig``); ``protect`` False turns SE
    protection off for the SE-unaware comparison. Checkpoint-based backends (gptq) write
    under ``work``."""
    info: dict = {}
    if (st := recipe.stage("prune")) is not None:
        from ..prune import prune, remap_profile

        r = prune(model, tok, dataclasses.replace(st, protect_super_experts=protect and st.protect_super_experts),
                  profile=prof, data=calib)
        info["prune"] = r
        prof = remap_profile(prof, r) if prof is not None else None  # expert ids moved
    if (st := recipe.stage("quantize")) is not None:
        from ..quant.apply import quantize_

        cfg = dataclasses.replace(st, protect_super_experts=protect and st.protect_super_experts)
        info["quantize"] = quantize_(model, cfg, profile=prof, tokenizer=tok, data=calib, work=work / f"quant-{protect}")
    return info


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
    if (st := recipe.stage("push")) is not None:
        check_push(st, dry_run)
    report = report or log.info
    with temp_dir(out.parent, out.name, "work") as work, option_style("recipe"):  # advice names recipe keys
        return _run(recipe, recipe_text, out, overwrite, dry_run, progress, work, Stages(report), announce or report)


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
         work: Path, stage: Stages, announce) -> RunResult:
    from ..devices import resolve_device
    from .streamed_run import choose_mode, run_streamed

    streamed, reason = choose_mode(recipe)
    device = resolve_device(recipe.model.device)
    if streamed:
        return run_streamed(recipe, recipe_text, out, overwrite, dry_run, progress, reason, announce)
    announce(f"plan: in memory on {device} ({reason})")
    t0 = time.time()
    with stage("load", f"{recipe.model.id} ({recipe.model.dtype}) and the data"):
        model = load_model(recipe.model.id, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code,
                           device=None if device.type == "cpu" else str(device))
        check_finite_weights(model, recipe.model.id)  # NaN weights: named here, not by a failed evaluation
        tok = load_tokenizer(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
        calib, eval_ids = _data(recipe, tok)
    ev = recipe.stage("evaluate")
    baseline = None
    sinks = {}  # column -> SinkHealth, for sink.{json,md,png} and evaluate.sink_check
    if ev:
        with stage("evaluate_baseline", "the uncompressed model"):
            baseline = measure(model, tok, eval_ids, ev, label="baseline")
            rows, sinks["baseline"] = measure_sink_rows(model, eval_ids)
            baseline.update(rows)
    prof, cache_hit = (None, False)
    if recipe.stage("profile") is not None:
        with stage("profile", "Super Experts"):
            prof, cache_hit = _cached_profile(recipe, model, tok, calib, progress)
        dead = dead_experts(prof)
        stage.report(f"    Super Experts: {prof.se_ids() or 'none'} (profile cache {'hit' if cache_hit else 'miss'}); "
                     f"{len(dead)} dead experts (no calibration token)" + (", listed in profile/super_experts.json"
                                                                           if dead else ""))
    unaware_model = copy.deepcopy(model) if ev and ev.compare_se_unaware and prof is not None else None
    with stage("compress", " + ".join(n for n in ("prune", "quantize") if recipe.stage(n)) or "nothing to do"):
        info = _compress(recipe, model, tok, prof, calib, protect=True, work=work)
    vllm_tasks = bool(ev and ev.tasks and ev.backend == "vllm")  # run on the export once written
    if vllm_tasks:  # an export vLLM cannot load is refused before evaluation and export
        check_vllm_loads(recipe, plan_report(info.get("quantize"), model))
    comparison = None
    if ev:
        with stage("evaluate", "SE-aware" + (" and the SE-unaware comparison variant (the same recipe with "
                                              "Super-Expert protection off)" if unaware_model is not None else "")):
            aware = measure(model, tok, eval_ids, ev, label="SE-aware")
            rows, sinks["SE-aware"] = measure_sink_rows(model, eval_ids)
            aware.update(rows)
            unaware = None
            if unaware_model is not None:
                _compress(recipe, unaware_model, tok, prof, calib, protect=False, work=work)
                unaware = measure(unaware_model, tok, eval_ids, ev, label="SE-unaware")
                rows, sinks["SE-unaware"] = measure_sink_rows(unaware_model, eval_ids)
                unaware.update(rows)
                del unaware_model
            comparison = Comparison.build(baseline, aware, unaware)
        comparison.check(ev.recovery_threshold)  # raises before anything is written
        if ev.sink_check is not None:
            from ..sink import check_sink

            check_sink(sinks["baseline"], sinks["SE-aware"], ev.sink_check, "SE-aware")
    manifest = _manifest(recipe, prof, cache_hit, stage.timings, info)
    manifest.update(mode="in memory", mode_reason=reason, device=str(device))
    t_export = time.time()
    with stage("export", f"writing {out}"), atomic_dir(out, overwrite) as tmp:
        if sinks:
            from ..sink import save_sink

            save_sink(sinks, tmp)
        if recipe.stage("export") is not None:
            def on_export(dest: Path) -> None:  # evaluate.backend vllm: the tasks on the export, before its card
                manifest.setdefault("notes", []).extend(in_memory_vllm_tasks(recipe, model, tok, dest, comparison))

            _export(recipe, recipe_text, model, tok, prof, info, comparison, tmp / "model",
                    on_export if vllm_tasks else None)
        write_run_files(tmp, recipe_text, prof, comparison)  # after the export: the comparison is complete
        manifest["timings_s"] = {**stage.timings, "export": round(time.time() - t_export, 2)}
        manifest["wall_seconds"] = round(time.time() - t0, 2)
        manifest["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return RunResult(Path(out), manifest, comparison, finish_push(recipe, out, manifest, dry_run, stage))


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


def _export(recipe, recipe_text, model, tok, prof, info, comparison, dest: Path,
            on_export: Callable[[Path], None] | None = None) -> None:
    """Write the export to ``dest``; ``on_export(dest)`` runs once the checkpoint is written, before the
    model card (which holds the comparison)."""
    plan_text = None
    if "quantize" in info:  # in the plan's export format (export.format), else its backend's own
        from ..quant.backends import exporter
        from ..quant.export import save_quantized

        plan = info["quantize"]
        save_quantized(model, tok, plan, dest)
        plan_text = plan.table()  # with the runtimes that load the export
        snippet = exporter(plan.meta).load_snippet
    elif "prune" in info:
        from ..prune import save_pruned

        save_pruned(model, tok, info["prune"], dest)
        snippet = PLAIN_SNIPPET
    else:
        dest.mkdir(parents=True)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        snippet = PLAIN_SNIPPET
    if on_export is not None:
        on_export(dest)
    pr = info.get("prune")
    if pr is not None and not (dest / "prune_report.json").exists():
        (dest / "prune_report.json").write_text(json.dumps(pr.to_json(), indent=1))
    prune_info = None if pr is None else {"method": pr.config.method, "num_experts_after": pr.num_experts_after,
                                          "removed_per_layer": pr.num_experts_before - pr.num_experts_after,
                                          "kept": pr.kept}
    ses = prof.se_ids() if prof is not None else []
    (dest / "README.md").write_text(model_card(recipe, recipe_text, ses, comparison, plan_text, prune_info, snippet))


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
        "timings_s": timings,
    }
