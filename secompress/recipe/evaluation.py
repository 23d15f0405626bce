"""The evaluate stage: perplexity and lm-eval tasks on in-memory models, and the comparison table.

Legend: a metric row holds the baseline, the SE-aware compressed model and the SE-unaware
variant (the same recipe with SE protection off); recovery = compressed / baseline for
higher-is-better metrics and baseline / compressed for lower-is-better ones (perplexity).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import SecompressError, require
from ..perplexity import perplexity

if TYPE_CHECKING:
    from ..sink import SinkHealth

log = logging.getLogger(__name__)
SINK_PREFIX = "sink/"  # sink-health rows: checked by evaluate.sink_check, not by recovery_threshold
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


class RecoveryError(SecompressError):
    """The compressed model recovered less than the recipe's threshold of some metric."""


def measure(model, tokenizer, eval_ids: torch.Tensor, stage) -> dict[str, float]:
    """{metric: value} for one model: held-out perplexity and each lm-eval task's main metrics."""
    out: dict[str, float] = {}
    if stage.perplexity:
        out["perplexity"] = perplexity(model, eval_ids)
    if stage.tasks:
        out.update(_lm_eval(model, tokenizer, stage))
    return out


def measure_sink_rows(model, eval_ids: torch.Tensor) -> tuple[dict[str, float], SinkHealth]:
    """The sink-health summary as comparison rows, and the per-layer measurement."""
    from ..sink import measure_sink

    h = measure_sink(model, eval_ids)
    return {f"{SINK_PREFIX}peak_massive_ratio": h.peak_ratio, f"{SINK_PREFIX}mean_sink_mass": h.mean_sink_mass}, h


def _lm_eval(model, tokenizer, stage) -> dict[str, float]:
    lm_eval = require("lm_eval", "eval", "The evaluate stage's lm-eval tasks")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8,
              add_bos_token=getattr(tokenizer, "bos_token_id", None) is not None)
    tm = TaskManager(include_path=[str(Path(p)) for p in stage.task_paths] or None)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(stage.tasks), task_manager=tm, limit=stage.limit,
                                  log_samples=False, bootstrap_iters=0)
    out = {}
    for task, metrics in res["results"].items():
        for key, value in metrics.items():
            name, comma, _ = key.partition(",")  # "acc,none": metric "acc" under filter "none"
            if comma and isinstance(value, (int, float)) and not name.endswith("_stderr"):
                out[f"{task}/{name}"] = float(value)
    return out


@dataclass
class Comparison:
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)  # metric -> column -> value

    @staticmethod
    def build(baseline: dict, aware: dict, unaware: dict | None) -> "Comparison":
        c = Comparison()
        for m, b in baseline.items():
            row = {"baseline": b, "se_aware": aware.get(m), "se_unaware": (unaware or {}).get(m)}
            for col in ("se_aware", "se_unaware"):
                v = row[col]
                lower = m.split("/")[-1] in LOWER_IS_BETTER
                row[f"recovery_{col}"] = None if v in (None, 0) or not b else (b / v if lower else v / b)
            c.rows[m] = row
        return c

    def check(self, threshold: float | None) -> None:
        if threshold is None:
            return
        bad = {m: r["recovery_se_aware"] for m, r in self.rows.items() if not m.startswith(SINK_PREFIX)
               and r["recovery_se_aware"] is not None and r["recovery_se_aware"] < threshold}
        if bad:
            raise RecoveryError("quality below the recipe's recovery threshold "
                                f"{threshold}: " + ", ".join(f"{m} recovers {v:.3f}" for m, v in bad.items()))

    def markdown(self) -> str:
        lines = ["| metric | baseline | SE-aware | SE-unaware | recovery (SE-aware) | recovery (SE-unaware) |",
                 "|---|---|---|---|---|---|"]
        f = lambda v: "n/a" if v is None else f"{v:.4g}"
        for m, r in self.rows.items():
            lines.append(f"| {m} | {f(r['baseline'])} | {f(r['se_aware'])} | {f(r['se_unaware'])} | "
                         f"{f(r['recovery_se_aware'])} | {f(r['recovery_se_unaware'])} |")
        return "\n".join(lines)

    def save(self, out: Path) -> list[Path]:
        (out / "comparison.json").write_text(json.dumps(self.rows, indent=1))
        (out / "comparison.md").write_text(self.markdown() + "\n")
        return [out / "comparison.json", out / "comparison.md", self.plot(out / "comparison.png")]

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.rows)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.6))
        width = 0.38
        for i, col in enumerate(("recovery_se_aware", "recovery_se_unaware")):
            vals = [self.rows[m][col] or 0 for m in names]
            ax.bar([x + (i - 0.5) * width for x in range(len(names))], vals, width,
                   label=col.replace("recovery_", "").replace("_", "-"))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel("recovery vs baseline")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
