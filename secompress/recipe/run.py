"""``secompress run RECIPE``: profile -> prune -> quantize -> evaluate -> export -> push.

Stages pass objects (a model, a ProfileResult, metric dicts), not folders. The only
thing kept between runs is the SE profile, cached under a key made of the model's
identity (hub id + revision, or a local checkpoint's safetensors headers, sizes and
mtimes), the calibration text's hash and the profile settings: any change gives a
new key, so a stale profile is never reused. Everything a run writes goes to a
temporary directory renamed to OUT at the end, so an interrupted run leaves nothing
half-written; re-running starts clean and reuses the cached profile.

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
import hashlib
import json
import logging
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data import load_calibration
from ..errors import SecompressError
from ..checkpoints import load_model, load_tokenizer
from ..errors import option_style
from ..outputs import atomic_dir, check_output_dir
from ..profile import ProfileConfig, ProfileResult, profile
from ..profile_io import load_profile, save_profile
from .evaluation import Comparison, measure, measure_sink_rows
from .publish import model_card, push
from .schema import Recipe, check_against_checkpoint

log = logging.getLogger(__name__)
CACHE_ENV = "SECOMPRESS_CACHE"


@dataclass
class RunResult:
    out: Path
    manifest: dict
    comparison: Comparison | None = None
    pushed: list[str] = field(default_factory=list)


def cache_root() -> Path:
    import os

    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "secompress"))


def model_fingerprint(model_id: str, revision: str | None) -> str:
    """Identity of the weights: a local folder's safetensors headers + sizes + mtimes, else id@revision."""
    p = Path(model_id)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")):
            st = f.stat()
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 22)))
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
    else:
        h.update(f"{model_id}@{revision or 'main'}".encode())
    return h.hexdigest()


def _profile_key(recipe: Recipe, data_sha: str, cfg: ProfileConfig) -> str:
    from .. import __version__

    blob = json.dumps({"model": model_fingerprint(recipe.model.id, recipe.model.revision), "data": data_sha,
                       "profile": repr(cfg), "dtype": recipe.model.dtype, "secompress": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cached_profile(recipe: Recipe, model, tok, calib, progress: bool) -> tuple[ProfileResult, bool]:
    st = cfg = recipe.stage("profile")  # a ProfileConfig (calibration sizes and dtype from data / model)
    path = cache_root() / "profiles" / _profile_key(recipe, calib.sha256, cfg)
    if (path / "super_experts.json").is_file():
        log.info("profile cache hit: %s", path)
        return load_profile(path), True
    src = recipe.model.id if st.streaming else model
    result = profile(src, tok, data=calib, config=cfg, revision=recipe.model.revision,
                     trust_remote_code=recipe.model.trust_remote_code, progress=progress)
    save_profile(result, path, overwrite=True)
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
               inputs=()) -> RunResult:
    """Run ``recipe`` into ``out``. ``root``: the folder ``out`` must stay inside (the CLI's ``out/``
    when the folder comes from the recipe's name); ``inputs``: paths the output must not replace
    (the model folder and data files of the recipe are always added)."""
    d = recipe.data
    inputs = (*inputs, recipe.model.id if Path(recipe.model.id).exists() else None,
              *(p for p in (d.calibration, d.eval) if p and Path(p).exists()))
    out = check_output_dir(out, overwrite, inputs=inputs, root=root)  # fail before any compute
    check_against_checkpoint(recipe)  # recipe values the checkpoint's config refutes, before any weight is read
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        with option_style("recipe"):  # advice in errors names recipe keys
            return _run(recipe, recipe_text, out, overwrite, dry_run, progress, Path(work))


def _run(recipe: Recipe, recipe_text: str, out: Path, overwrite: bool, dry_run: bool, progress: bool,
         work: Path) -> RunResult:
    t0 = time.time()
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 2)
        return time.time()

    model = load_model(recipe.model.id, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code)
    tok = load_tokenizer(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
    calib, eval_ids = _data(recipe, tok)
    t = tick("load", t0)
    ev = recipe.stage("evaluate")
    baseline = measure(model, tok, eval_ids, ev) if ev else None
    sinks = {}  # column -> SinkHealth, for sink.{json,md,png} and evaluate.sink_check
    if ev:
        rows, sinks["baseline"] = measure_sink_rows(model, eval_ids)
        baseline.update(rows)
    t = tick("evaluate_baseline", t)
    prof, cache_hit = (None, False)
    if recipe.stage("profile") is not None:
        prof, cache_hit = _cached_profile(recipe, model, tok, calib, progress)
    t = tick("profile", t)
    unaware_model = copy.deepcopy(model) if ev and ev.compare_se_unaware and prof is not None else None
    info = _compress(recipe, model, tok, prof, calib, protect=True, work=work)
    t = tick("compress", t)
    comparison = None
    if ev:
        aware = measure(model, tok, eval_ids, ev)
        rows, sinks["SE-aware"] = measure_sink_rows(model, eval_ids)
        aware.update(rows)
        unaware = None
        if unaware_model is not None:
            _compress(recipe, unaware_model, tok, prof, calib, protect=False, work=work)
            unaware = measure(unaware_model, tok, eval_ids, ev)
            rows, sinks["SE-unaware"] = measure_sink_rows(unaware_model, eval_ids)
            unaware.update(rows)
            del unaware_model
        comparison = Comparison.build(baseline, aware, unaware)
        t = tick("evaluate", t)
        comparison.check(ev.recovery_threshold)  # raises before anything is written
        if ev.sink_check is not None:
            from ..sink import check_sink

            check_sink(sinks["baseline"], sinks["SE-aware"], ev.sink_check, "SE-aware")
    manifest = _manifest(recipe, prof, cache_hit, timings, info)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "recipe.yaml").write_text(recipe_text)
        if prof is not None:
            save_profile(prof, tmp / "profile")
        if comparison is not None:
            comparison.save(tmp)
        if sinks:
            from ..sink import save_sink

            save_sink(sinks, tmp)
        if recipe.stage("export") is not None:
            _export(recipe, recipe_text, model, tok, prof, info, comparison, tmp / "model")
        t = tick("export", t)
        manifest["wall_seconds"] = round(time.time() - t0, 2)
        manifest["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    pushed: list[str] = []
    if (st := recipe.stage("push")) is not None:  # after the rename: a failed upload keeps the export
        pushed = push(Path(out) / "model", st, dry_run)
        manifest["push"] = {"repo_id": st.repo_id, "dry_run": dry_run, "files": pushed}
        (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return RunResult(Path(out), manifest, comparison, pushed)


PLAIN_SNIPPET = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained('PATH')"


def _export(recipe, recipe_text, model, tok, prof, info, comparison, dest: Path) -> None:
    plan_text = None
    if "quantize" in info:  # in the format of the plan's backend
        from ..quant.backends import get_backend
        from ..quant.export import save_quantized

        plan = info["quantize"]
        save_quantized(model, tok, plan, dest)
        plan_text = plan.table()
        snippet = get_backend(plan.meta["method"]).load_snippet
    elif "prune" in info:
        from ..prune import save_pruned

        save_pruned(model, tok, info["prune"], dest)
        snippet = PLAIN_SNIPPET
    else:
        dest.mkdir(parents=True)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        snippet = PLAIN_SNIPPET
    pr = info.get("prune")
    if pr is not None and not (dest / "prune_report.json").exists():
        (dest / "prune_report.json").write_text(json.dumps(pr.to_json(), indent=1))
    prune_info = None if pr is None else {"method": pr.config.method, "num_experts_after": pr.num_experts_after,
                                          "removed_per_layer": pr.num_experts_before - pr.num_experts_after}
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
