"""``secompress run`` for checkpoints larger than memory: the recipe on the layer-by-layer engine.

:func:`choose_mode` picks in memory or streamed (``model.streaming`` forces it; otherwise streamed
when the checkpoint, in the compute dtype, exceeds ``model.memory_share`` of the available memory)
and says why. :func:`run_streamed` then runs the same stages as the in-memory run, as passes over
the shards (:mod:`secompress.streamed`): the streamed SE profile (cached like the in-memory one);
one pass with the baseline perplexity, pruning, quantization, the SE-aware perplexity and the
export (RTN and bitsandbytes per layer; GPTQ runs gptqmodel's child process on the pruned checkpoint
first, :mod:`secompress.quant.gptq_stream`); one SE-unaware pass (evaluation only, never a copy of
the model). The evaluate stage's sink health
(baseline, SE-aware, SE-unaware; ``sink.{json,md,png}``) is measured during those passes
(:mod:`secompress.sink_meter`, the numbers :func:`~secompress.sink.measure_sink` gives in memory);
``evaluate.sink_check`` is applied right after the first pass, so a lost attention sink fails
the run before the SE-unaware pass and leaves nothing behind. Everything is planned and checked
(methods, disk space) before the first pass. lm-eval tasks run on the export once it is written
(:mod:`secompress.recipe.export_eval`, ``evaluate.backend``); their baseline and SE-unaware numbers
would need more passes over the source, so the manifest says they were not measured.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..devices import resolve_device
from ..errors import SecompressError
from .schema import Recipe

log = logging.getLogger(__name__)


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


def choose_mode(recipe: Recipe) -> tuple[bool, str]:
    """(streamed?, the reason, for the console and the manifest)."""
    m = recipe.model
    if m.streaming is not None:
        return m.streaming, f"model.streaming: {str(m.streaming).lower()}"
    if not Path(m.id).is_dir():
        return False, f"'{m.id}' is not a local folder (size unknown): in memory; set model.streaming to choose"
    from ..adapters import get_adapter
    from ..checkpoints import load_config, resolve_dtype
    from ..streamed import checkpoint_sizes

    config = load_config(m.id, m.revision, m.trust_remote_code)
    total = checkpoint_sizes(m.id, get_adapter(config).layers_path, resolve_dtype(m.dtype, config))[3]
    avail = available_memory()
    streamed = total > m.memory_share * avail
    return streamed, (f"the checkpoint takes {total / 2**30:.2f} GiB in {m.dtype}, "
                      f"{'more' if streamed else 'not more'} than model.memory_share {m.memory_share} x "
                      f"{avail / 2**30:.1f} GiB available")


def _configs(recipe: Recipe):
    """The recipe's PruneConfig and QuantConfig (None where the stage is absent); perplexity is the pass's own."""
    import dataclasses

    pc = recipe.stage("prune")
    return (dataclasses.replace(pc, eval_samples=0) if pc is not None else None), recipe.stage("quantize")


def run_streamed(recipe: Recipe, recipe_text: str, out: Path, overwrite: bool, dry_run: bool, progress: bool,
                 reason: str, announce=log.info):
    """The recipe as streamed passes; returns a :class:`~secompress.recipe.run.RunResult`."""
    from ..checkpoints import load_config, load_tokenizer, resolve_dtype
    from ..outputs import atomic_dir
    from ..prune.api import REPORT_NAME, build_result
    from ..streamed import StreamedJob, compress_streamed, plan_streamed
    from ..sink import check_sink, save_sink
    from .evaluation import Comparison, sink_rows
    from .export_eval import check_vllm_loads, streamed_tasks
    from .publish import model_card
    from ..quant.backends import exporter
    from .run import PLAIN_SNIPPET, RunResult, _cached_profile, _data, _manifest, finish_push, write_run_files

    t0 = time.time()
    timings: dict[str, float] = {}
    m = recipe.model
    device = resolve_device(m.device)
    tok = load_tokenizer(m.id, m.revision, m.trust_remote_code)
    calib, eval_ids = _data(recipe, tok)
    ev = recipe.stage("evaluate")
    notes = []
    pc, qc = _configs(recipe)
    dtype = resolve_dtype(m.dtype, load_config(m.id, m.revision, m.trust_remote_code))
    job = StreamedJob(prune=pc, quant=qc, dtype=dtype, device=str(device))  # checks methods
    if (pc is not None or (qc is not None and qc.avg_bits is not None)) and recipe.stage("profile") is None:
        raise SecompressError("streamed pruning and bit allocation need the profile stage")
    prof, cache_hit = (None, False)
    t = time.time()
    if recipe.stage("profile") is not None:
        prof, cache_hit = _cached_profile(recipe, None, tok, calib, progress, streaming=True, device=str(device))
    timings["profile"] = round(time.time() - t, 2)
    plan = plan_streamed(m.id, job, prof, calib=calib.input_ids)
    check_vllm_loads(recipe, plan.report)  # export_eval
    compare = ev is not None and ev.compare_se_unaware and prof is not None
    plan_u = plan_streamed(m.id, job, prof, protect=False, calib=calib.input_ids) if compare else None
    measure = ev is not None and ev.perplexity
    sink = ev is not None  # as in memory: sink health of every variant the evaluate stage measures
    windows = eval_ids if sink else None  # the evaluation windows, through every pass
    announce(f"{plan.describe(*(windows.shape if windows is not None else (0, 0)))} ({reason})")
    export = recipe.stage("export") is not None

    with atomic_dir(out, overwrite) as tmp:  # a failed gate below removes it, the export inside included
        t = time.time()
        res = compress_streamed(plan, windows, tmp / "model" if export else None, tok, progress=progress,
                                sink=sink)
        timings["compress_export"] = round(time.time() - t, 2)
        sinks = {"baseline": res.sink_before, "SE-aware": res.sink_after} if sink else {}
        if sink and ev.sink_check is not None:  # before the SE-unaware pass: a lost sink fails the run now
            check_sink(sinks["baseline"], sinks["SE-aware"], ev.sink_check, "SE-aware")
        comparison = None
        if ev is not None:
            t = time.time()
            rows = {"perplexity": res.perplexity_before} if measure else {}
            aware = {"perplexity": res.perplexity_after} if measure else {}
            unaware = None
            if plan_u is not None:
                r_u = compress_streamed(plan_u, windows, None, tok, baseline=False, progress=progress, sink=sink)
                unaware = {"perplexity": r_u.perplexity_after} if measure else {}
                unaware.update(sink_rows(r_u.sink_after))
                sinks["SE-unaware"] = r_u.sink_after
            rows.update(sink_rows(sinks["baseline"]))
            aware.update(sink_rows(sinks["SE-aware"]))
            comparison = Comparison.build(rows, aware, unaware)
            timings["evaluate_se_unaware"] = round(time.time() - t, 2)
            # ---- lm-eval tasks on the written export (secompress.recipe.export_eval) ----
            t = time.time()
            streamed_tasks(recipe, tmp / "model" if export else None, tok, dtype, comparison, notes)
            timings["evaluate_tasks"] = round(time.time() - t, 2)
            # ---- end of the lm-eval block ----
            comparison.check(ev.recovery_threshold)
        info = {}
        pr = None
        if plan.restructure is not None:  # merging / HEAPr: decided during the pass
            from ..prune.streamed_merge import streamed_result

            pr = streamed_result(plan.restructure, plan.model, res.extra["restructure"], prof, calib.source,
                                 (None, None), res.seconds)
        elif plan.removal is not None:
            pr = build_result(pc, plan.model, plan.removal, plan.selection, prof, sorted(plan.removal.kept),
                              calib.source, None, (None, None), res.seconds)
        if pr is not None:
            pr.model = m.id
            info["prune"] = pr
        write_run_files(tmp, recipe_text, prof, comparison)
        if sinks:
            save_sink(sinks, tmp)
        if export:
            dest = tmp / "model"
            if pr is not None:
                (dest / REPORT_NAME).write_text(json.dumps(pr.to_json(), indent=1))
            prune_info = None if pr is None else {"method": pr.config.method, "num_experts_after": pr.num_experts_after,
                                                  "removed_per_layer": pr.num_experts_before - pr.num_experts_after}
            snippet = exporter(plan.quant_plan.meta).load_snippet if plan.quant_plan is not None else PLAIN_SNIPPET
            (dest / "README.md").write_text(model_card(
                recipe, recipe_text, prof.se_ids() if prof is not None else [], comparison,
                plan.quant_plan.table() if plan.quant_plan is not None else None, prune_info, snippet))
        manifest = _manifest(recipe, prof, cache_hit, timings, info)
        manifest.update(mode="streamed", mode_reason=reason, device=str(device), notes=notes,
                        plan={"checkpoint_bytes": plan.checkpoint_bytes, "largest_layer_bytes": plan.layer_bytes,
                              "embeddings_head_bytes": plan.rest_bytes, "output_bytes": plan.output_bytes,
                              "estimated_peak_bytes": plan.peak_bytes(*(windows.shape if windows is not None
                                                                        else (0, 0)))})
        manifest["wall_seconds"] = round(time.time() - t0, 2)
        import resource

        manifest["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    pushed = finish_push(recipe, out, manifest, dry_run)
    return RunResult(Path(out), manifest, comparison, pushed)
