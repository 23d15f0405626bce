"""Model card (README.md with Hub metadata) and the push stage."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from ..errors import SecompressError, require

log = logging.getLogger(__name__)


def model_card(recipe, recipe_text: str, ses: list, comparison, plan_text: str | None, prune_info: dict | None,
               load_snippet: str) -> str:
    """A Hub model card: YAML metadata (base_model, tags, library_name, model-index) + sections."""
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
    meta = {"base_model": recipe.model.id, "library_name": "transformers",
            "tags": ["moe", "secompress", "super-experts", *(["pruned"] if recipe.stage("prune") else []),
                     *(["quantized"] if recipe.stage("quantize") else [])]}
    if results:
        meta["model-index"] = [{"name": recipe.name, "results": results}]
    se_lines = "\n".join(f"| {l} | {e} |" for l, e in ses) or "| - | - |"
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False).strip() + "\n---",
        f"# {recipe.name}",
        f"Compressed from `{recipe.model.id}` by [secompress](https://example.invalid/secompress), which keeps the "
        "model's Super Experts (Su et al. 2025, arXiv 2507.23279) intact.",
        "## Super Experts (never pruned, kept at high precision)", "| layer | expert |", "|---|---|", se_lines,
    ]
    if prune_info:
        parts += ["## Pruning", f"Removed {prune_info.get('removed_per_layer')} routed experts per MoE layer "
                  f"(method `{prune_info.get('method')}`), {prune_info.get('num_experts_after')} left."]
    if plan_text:
        parts += ["## Precision plan", "```", plan_text.strip(), "```"]
    if comparison is not None:
        parts += ["## Evaluation", comparison.markdown()]
    parts += ["## How to load", "```python", load_snippet.strip(), "```",
              "## Recipe", "```yaml", recipe_text.strip(), "```",
              "## Limitations",
              "Quality was measured only on the tasks above. Pruned experts are gone: inputs that relied on them "
              "degrade. Calibration data shapes which experts were judged unimportant."]
    return "\n\n".join(parts) + "\n"


def push(folder: Path, stage, dry_run: bool) -> list[str]:
    """Upload ``folder`` to ``stage.repo_id``; with ``dry_run`` only list what would be uploaded."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        return files
    hub = require("huggingface_hub", "hub", "Pushing to the Hugging Face Hub")
    token = os.environ.get("HF_TOKEN") or hub.get_token()
    if not token:
        raise SecompressError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (it is never printed)")
    api = hub.HfApi(token=token)
    api.create_repo(stage.repo_id, private=stage.private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=stage.repo_id, commit_message=stage.commit_message)
    log.info("pushed %d files to %s", len(files), stage.repo_id)
    return files
