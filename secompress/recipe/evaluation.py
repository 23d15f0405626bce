"""The evaluate stage: perplexity and lm-eval tasks on in-memory models, and the comparison table.

Legend: a metric row holds the baseline, the SE-aware compressed model and the SE-unaware
variant (the same recipe with SE protection off); recovery = compressed / baseline for
higher-is-better metrics and baseline / compressed for lower-is-better ones (perplexity).
"""
from __future__ import annotations

import functools
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING


from ..errors import require, RecoveryError

if TYPE_CHECKING:
    from ..sink import SinkHealth

log = logging.getLogger(__name__)
SINK_PREFIX = "sink/"  # sink-health rows: checked by evaluate.sink_check, not by recovery_threshold
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def measure_tasks(model, tokenizer, stage, label: str = "model") -> dict[str, float]:
    """{task/metric: value}: each lm-eval task's main metrics on a model in memory (``evaluate.backend:
    hf``; perplexity and sink health come from the passes). ``label`` names the variant (baseline,
    SE-aware, SE-unaware) on lm-eval's progress bars."""
    return _lm_eval(model, tokenizer, stage, label) if stage.tasks else {}


def sink_rows(h: SinkHealth) -> dict[str, float]:
    """The sink-health summary of one model as comparison rows."""
    return {f"{SINK_PREFIX}peak_massive_ratio": h.peak_ratio, f"{SINK_PREFIX}mean_sink_mass": h.mean_sink_mass}


class _LmEvalNoise(logging.Filter):
    """lm-eval warns on every evaluation that an in-memory model was passed (which is how secompress
    calls it, on purpose) and that a task takes custom kwargs: the first two are dropped, any other
    message is shown once per process."""

    DROP = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through")

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith(self.DROP) or msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_NOISE = _LmEvalNoise()
_NOISY_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task")


@contextmanager
def _labelled_lm_eval(label: str):
    """Inside the block lm-eval's HF model labels its progress bars ``[label]`` and its repeated
    warnings are filtered (see :class:`_LmEvalNoise`); both undone on exit."""
    import lm_eval.models.huggingface as hf

    bar = hf.tqdm

    def labelled(*args, **kwargs):
        if "desc" in kwargs:
            kwargs["desc"] = f"[{label}] {kwargs['desc']}"
        return bar(*args, **kwargs)

    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    hf.tqdm = labelled
    for lg in loggers:
        lg.addFilter(_NOISE)
    try:
        yield
    finally:
        hf.tqdm = bar
        for lg in loggers:
            lg.removeFilter(_NOISE)


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...]):
    """lm-eval's task index (it reads every task YAML it ships: seconds), built once per run and folder set."""
    require("lm_eval", "eval", "The evaluate stage's lm-eval tasks")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


def task_manager(stage):
    return _task_manager(tuple(str(Path(p)) for p in stage.task_paths))


def check_tasks(recipe) -> None:
    """Before any weight is read: every lm-eval task the recipe names exists (in lm-eval or its task_paths),
    else a RecipeError at ``stages.evaluate.tasks`` with the closest names."""
    import difflib

    from ..errors import RecipeError

    ev = recipe.stage("evaluate")
    if ev is None or not ev.tasks:
        return
    missing = [p for p in ev.task_paths if not Path(p).is_dir()]
    if missing:
        raise RecipeError(f"{recipe.at('stages.evaluate.task_paths')}: '{missing[0]}' is not a folder")
    known = set(task_manager(ev).all_tasks)
    for name in ev.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise RecipeError(f"{recipe.at('stages.evaluate.tasks')}: lm-eval has no task '{name}'"
                              + (f"; did you mean {', '.join(close)}?" if close else "")
                              + (f" (searched lm-eval's tasks and {', '.join(ev.task_paths)})" if ev.task_paths
                                 else " (add the folder of your own tasks to task_paths)"))


def _lm_eval(model, tokenizer, stage, label: str) -> dict[str, float]:
    lm_eval = require("lm_eval", "eval", "The evaluate stage's lm-eval tasks")
    from lm_eval.models.huggingface import HFLM

    with _labelled_lm_eval(label):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8,
                  add_bos_token=getattr(tokenizer, "bos_token_id", None) is not None)
        tm = task_manager(stage)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(stage.tasks), task_manager=tm, limit=stage.limit,
                                      log_samples=False, bootstrap_iters=0)
    return task_rows(res)


def task_rows(res: dict) -> dict[str, float]:
    """``{task/metric: value}`` from lm-eval's ``simple_evaluate`` result (stderr rows left out)."""
    out = {}
    for task, metrics in res["results"].items():
        for key, value in metrics.items():
            name, comma, _ = key.partition(",")  # "acc,none": metric "acc" under filter "none"
            if comma and isinstance(value, (int, float)) and not name.endswith("_stderr"):
                out[f"{task}/{name}"] = float(value)
    return out


def _row(metric: str, b: float | None, aware: float | None, unaware: float | None) -> dict[str, float | None]:
    row = {"baseline": b, "se_aware": aware, "se_unaware": unaware}
    lower = metric.split("/")[-1] in LOWER_IS_BETTER
    for col in ("se_aware", "se_unaware"):
        v = row[col]
        row[f"recovery_{col}"] = None if v in (None, 0) or not b else (b / v if lower else v / b)
    return row


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


MATTERS_PCT = 1.0  # percentage points between the SE-aware and SE-unaware changes that count as an effect


@dataclass
class Comparison:
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)  # metric -> column -> value

    @staticmethod
    def build(baseline: dict, aware: dict, unaware: dict | None) -> "Comparison":
        c = Comparison()
        for m, b in baseline.items():
            c.rows[m] = _row(m, b, aware.get(m), (unaware or {}).get(m))
        return c

    def add(self, aware: dict[str, float], baseline: dict[str, float] | None = None,
            unaware: dict[str, float] | None = None) -> None:
        """Rows for metrics measured after the table was built (lm-eval tasks on the export); a column
        without a number (baseline or SE-unaware not measured) reads n/a, and so does its recovery."""
        for m, v in aware.items():
            self.rows[m] = _row(m, (baseline or {}).get(m), v, (unaware or {}).get(m))

    def check(self, threshold: float | None) -> None:
        if threshold is None:
            return
        bad = {m: r["recovery_se_aware"] for m, r in self.rows.items() if not m.startswith(SINK_PREFIX)
               and r["recovery_se_aware"] is not None and r["recovery_se_aware"] < threshold}
        if bad:
            raise RecoveryError("quality below the recipe's recovery threshold "
                                f"{threshold}: " + ", ".join(f"{m} recovers {v:.3f}" for m, v in bad.items()))

    def se_effect(self, touched: list[str]) -> str:
        """One sentence on what Super-Expert protection changed, from the SE-aware and SE-unaware columns;
        ``touched``: what the SE-unaware variant did to the Super Experts (empty: nothing)."""
        if not any(r["se_unaware"] is not None for r in self.rows.values()):
            return "No SE-unaware variant was measured (evaluate.compare_se_unaware: false or no profile)."
        if not touched:
            return ("Super-Expert protection changed nothing in this recipe: without it the same experts are "
                    "pruned and the Super Experts quantized the same way, so the SE-aware and SE-unaware columns "
                    "differ only by chance. Protection matters where a method would touch a Super Expert "
                    "(e.g. merging at 50%, or quantizing its layer).")
        parts, mattered, same = [], [], []
        for metric, label in (("perplexity", "perplexity"), (f"{SINK_PREFIX}peak_massive_ratio", "peak massive ratio"),
                              (f"{SINK_PREFIX}mean_sink_mass", "attention-sink mass")):
            r = self.rows.get(metric)
            if r and r["se_aware"] is not None and r["se_unaware"] is not None and r["baseline"]:
                parts.append(f"{label} {r['se_aware']:.4g} with protection vs {r['se_unaware']:.4g} without "
                             f"(baseline {r['baseline']:.4g})")
                a, u = (100 * (r[k] / r["baseline"] - 1) for k in ("se_aware", "se_unaware"))
                (mattered if abs(a - u) >= MATTERS_PCT else same).append(f"{label} ({a:+.1f}% vs {u:+.1f}%)")
        verdict = []
        if mattered:
            verdict.append("protection mattered for the " + ", ".join(mattered))
        if same:
            verdict.append(f"the {' and '.join(same)} differ by less than {MATTERS_PCT:g} point with or without it")
        return (f"Without protection the same recipe {'; '.join(touched)}; " + "; ".join(parts) + ". " +
                (_first_upper("; ".join(verdict)) + " (changes vs the baseline, with vs without protection)."
                 if verdict else ""))

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
        """Per metric, the compressed models' quality change vs the baseline in percent (recovery - 1;
        below 0 is worse, whatever the metric's direction), with the value on each bar: recoveries all
        sit near 1.0, so a 0-1 axis would hide the differences."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.rows)
        cols = [("recovery_se_aware", "SE-aware (Super Experts protected)", "C0"),
                ("recovery_se_unaware", "SE-unaware (same recipe, protection off)", "C3")]
        cols = [c for c in cols if any(self.rows[m][c[0]] is not None for m in names)]
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names) + 2), 4.2))
        width = 0.8 / max(1, len(cols))
        lo, hi = 0.0, 0.0
        for i, (col, label, color) in enumerate(cols):
            vals = [None if self.rows[m][col] is None else 100 * (self.rows[m][col] - 1) for m in names]
            xs = [x + (i - (len(cols) - 1) / 2) * width for x in range(len(names))]
            bars = ax.bar(xs, [v or 0 for v in vals], width, label=label, color=color)
            for b, v in zip(bars, vals):
                txt = "n/a" if v is None else f"{v:+.2f}%"
                ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", fontsize=8,
                            va="bottom" if (v or 0) >= 0 else "top", xytext=(0, 2 if (v or 0) >= 0 else -2),
                            textcoords="offset points")
            lo, hi = min(lo, *[v or 0 for v in vals]), max(hi, *[v or 0 for v in vals])
        pad = 0.25 * max(hi - lo, 0.5)
        ax.set_ylim(lo - pad, hi + pad)  # zoomed to the differences, 0 (= baseline) always shown
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), [self._label(m) for m in names], fontsize=8)
        ax.set_ylabel("change vs baseline (%)\n(recovery - 1; below 0 = worse)")
        ax.set_title("Compressed vs baseline, per metric")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(cols), fontsize=8, frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _label(self, metric: str) -> str:
        r = self.rows[metric]
        b = r["baseline"]
        return f"{metric}\nbaseline {'n/a' if b is None else f'{b:.4g}'}" + (" (lower is better)" if metric.split("/")[-1] in LOWER_IS_BETTER else "")
