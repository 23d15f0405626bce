"""Model card (README.md with Hub metadata) and the push stage."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import yaml

from ..errors import SecompressError, require, PushError

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model_id: str) -> bool:
    """``org/name`` that is not a local path."""
    return bool(HUB_ID.match(model_id)) and not Path(model_id).exists()


def base_card_metadata(model_id: str) -> dict:
    """``license`` and ``pipeline_tag`` from the base model's own card, when it is a local folder (a
    hub model's card is not fetched: nothing goes to the network for a card)."""
    readme = Path(model_id) / "README.md"
    if not readme.is_file():
        return {}
    m = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link", "pipeline_tag")
            if isinstance(meta, dict) and k in meta}


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def _code(lang: str, text: str) -> str:
    return f"```{lang}\n{text.strip()}\n```"


def _se_rows(ses: list, prune_info: dict | None) -> list[list]:
    """(layer, expert before pruning, expert after pruning): pruning renumbers the kept experts."""
    kept = (prune_info or {}).get("kept")
    rows = []
    for layer, e in ses:
        if kept is None:
            rows.append([layer, e])
        else:
            k = list(kept.get(layer, kept.get(str(layer), [])))
            rows.append([layer, e, e if e == "shared" else (k.index(e) if e in k else "removed")])
    return rows


def model_card(recipe, recipe_text: str, ses: list, comparison, plan_text: str | None, prune_info: dict | None,
               load_snippet: str, size: dict | None = None, se_effect: str | None = None,
               evidence: str | None = None) -> str:
    """A Hub model card: YAML metadata (base_model, license, pipeline_tag, tags, library_name,
    model-index) + sections. ``ses``: (layer, expert) in the base model's numbering;
    ``prune_info['kept']`` (layer -> kept expert ids) gives their numbers in the pruned model."""
    dtype = recipe.model.dtype
    evaluated = (f"Evaluated in {dtype} (the recipe's `model.dtype`); " if dtype != "auto" else
                 "Evaluated in the checkpoint's own dtype (`model.dtype: auto`); ")
    return _card(recipe.model.id, recipe.name, bool(recipe.stage("prune")), bool(recipe.stage("quantize")),
                 "`secompress run` with the recipe below", ("## Recipe", _code("yaml", recipe_text)), ses, comparison,
                 plan_text, prune_info, load_snippet, size, se_effect, evidence, evaluated)


def command_card(base: str, name: str, command: str, ses: list, plan_text: str | None, prune_info: dict | None,
                 load_snippet: str, size: dict | None = None, evidence: str | None = None) -> str:
    """The model card of an export written by ``secompress prune`` / ``quantize`` (no evaluation table:
    ``secompress evaluate`` measures it), naming the command that made it."""
    return _card(base, name, prune_info is not None, plan_text is not None, f"`{command}`",
                 ("## Command", _code("bash", command)), ses, None, plan_text, prune_info, load_snippet, size, None,
                 evidence, "")


def _card(base: str, name: str, pruned: bool, quantized: bool, how: str, made_by: tuple, ses: list, comparison,
          plan_text: str | None, prune_info: dict | None, load_snippet: str, size: dict | None, se_effect: str | None,
          evidence: str | None, evaluated: str) -> str:
    from .. import __version__

    results = []
    if comparison is not None:
        for metric, row in comparison.rows.items():
            if row["se_aware"] is None:
                continue
            task, _, name = metric.rpartition("/")
            results.append({"task": {"type": "text-generation"},
                            "dataset": {"name": task or "held-out text", "type": task or "perplexity"},
                            "metrics": [{"type": name or metric, "value": round(float(row["se_aware"]), 6),
                                         "name": f"{metric} (SE-aware compressed)"}]})
    hub = is_hub_id(base)
    meta = {**({"base_model": base} if hub else {}), **base_card_metadata(base), "library_name": "transformers"}
    meta.setdefault("pipeline_tag", "text-generation")  # a causal LM, whatever the base card says of itself
    meta["tags"] = ["moe", "secompress", "super-experts", *(["pruned"] if pruned else []),
                    *(["quantized"] if quantized else [])]
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    origin = (f"[`{base}`](https://huggingface.co/{base})" if hub else
              f"the local checkpoint `{base}` (not a Hub id, so `base_model` is not set)")
    sections = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False).strip() + "\n---",
        f"# {name}",
        f"Compressed from {origin} by secompress {__version__} ({how}), "
        "which keeps the model's Super Experts (Su et al. 2025, arXiv 2507.23279) intact.",
    ]
    if size:
        sections.append(f"Size on disk: {size['bytes'] / 2**20:.1f} MiB, {size['ratio']:.2f}x the base checkpoint's "
                        f"{size['source_bytes'] / 2**20:.1f} MiB ({size['files']} safetensors files).")
    if prune_info and prune_info.get("kept") is not None:
        sections += ["## Super Experts (never pruned, kept at high precision)",
                     "Pruning renumbers the experts that remain in each layer: the table gives each Super "
                     "Expert's number in the base model and in this model.",
                     _table(["layer", "expert (base model)", "expert (this model)"], _se_rows(ses, prune_info))
                     if ses else "None found."]
    else:
        sections += ["## Super Experts (never pruned, kept at high precision)",
                     _table(["layer", "expert"], _se_rows(ses, None)) if ses else "None found."]
    if evidence:
        sections.append(f"Evidence for the Super-Expert verdict: {evidence}.")
    if prune_info:
        sections += ["## Pruning", f"Removed {prune_info.get('removed_per_layer')} routed experts per MoE layer "
                     f"(method `{prune_info.get('method')}`), {prune_info.get('num_experts_after')} left."]
    if plan_text:
        sections += ["## Precision plan", _code("", plan_text)]
    if comparison is not None:
        sections += ["## Evaluation", evaluated +
                     "SE-unaware is the same recipe with Super-Expert protection off, for comparison.",
                     comparison.markdown()] + ([se_effect] if se_effect else [])
    sections += ["## How to load", _code("python", load_snippet),
                 *made_by,
                 "## Limitations",
                 "Quality was measured only on the tasks above. Pruned experts are gone: inputs that relied on them "
                 "degrade. Calibration data shapes which experts were judged unimportant."]
    return "\n\n".join(sections) + "\n"


def _token(hub) -> str | None:
    return os.environ.get("HF_TOKEN") or hub.get_token()


def check_push(stage, dry_run: bool) -> None:
    """Before any compute: a real push needs huggingface_hub and a token (never printed)."""
    if dry_run:
        return
    hub = require("huggingface_hub", "hub", "Pushing to the Hugging Face Hub")
    if not _token(hub):
        raise SecompressError(f"push to '{stage.repo_id}' needs a Hugging Face token: set HF_TOKEN or run "
                              "`hf auth login`, or pass --dry-run (checked before any compute)")


def push(folder: Path, stage, dry_run: bool) -> list[str]:
    """Upload ``folder`` to ``stage.repo_id``; with ``dry_run`` only list what would be uploaded.
    A failed upload (offline, refused) is a :class:`PushError` saying where the export was kept."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        return files
    check_push(stage, dry_run)
    hub = require("huggingface_hub", "hub", "Pushing to the Hugging Face Hub")
    api = hub.HfApi(token=_token(hub))
    try:
        api.create_repo(stage.repo_id, private=stage.private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=stage.repo_id, commit_message=stage.commit_message)
    except Exception as e:  # noqa: BLE001 -- network, HTTP and auth errors all end the same way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PushError(f"push to '{stage.repo_id}' failed ({type(e).__name__}: {reason}); the export was kept in "
                        f"'{folder}': upload it later with `hf upload {stage.repo_id} {folder}`") from None
    log.info("pushed %d files to %s", len(files), stage.repo_id)
    return files
