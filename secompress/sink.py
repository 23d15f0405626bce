"""Sink health: does a compressed model still make its massive activations and attention sink?

Super Experts (Su et al. 2025, arXiv 2507.23279) write the massive activations of the
first token that make attention heads park their mass on it (the attention sink). A
compression that damages an SE shows up here before it shows up anywhere else:

    base = measure_sink(model, ids)                 # on the baseline, before compressing
    comp = measure_sink(compressed, ids)
    check_sink(base, comp, threshold=0.5)            # SinkHealthError if either fell below half

Per decoder layer, on held-out windows, exactly what the profiler records
(:class:`secompress.instrument.Recorder` hooks, eager attention): max |h| over all tokens,
max |h| at the first token, the median |h|, the massive ratio = first-token max / median,
and the attention mass that queries 1.. put on token 0 (mean over heads and batches).
The check compares the peak massive ratio over layers and the mean sink mass over layers.
Legend: L decoder layers, N windows, S sequence length.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SinkHealthError
from .instrument import Recorder, instrument
from .checkpoints import check_model
from .se_rule import massive_ratio

log = logging.getLogger(__name__)
SINK_BATCH_SIZE = 4  # windows per batch of the per-batch statistics (median |h|, sink mass)


@dataclass
class SinkHealth:
    hidden_max: list[float]  # [L]
    hidden_first_max: list[float]  # [L]
    hidden_median: list[float]  # [L]
    sink_mass: list[float]  # [L] (NaN where no attention was measured)

    @property
    def massive_ratio(self) -> list[float]:  # [L]
        return [massive_ratio(f, m) for f, m in zip(self.hidden_first_max, self.hidden_median)]

    @property
    def peak_ratio(self) -> float:
        return float(max(self.massive_ratio))

    @property
    def mean_sink_mass(self) -> float:
        v = [x for x in self.sink_mass if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    def to_json(self) -> dict:
        return {"peak_massive_ratio": self.peak_ratio, "mean_sink_mass": self.mean_sink_mass,
                "massive_ratio": self.massive_ratio, "sink_mass": self.sink_mass, "hidden_max": self.hidden_max,
                "hidden_first_max": self.hidden_first_max, "hidden_median": self.hidden_median}


def sink_health(rec: Recorder, num_layers: int) -> SinkHealth:
    """The per-layer statistics a :class:`~secompress.instrument.Recorder` collected (hidden states
    and attention, one observation per batch of windows) as a :class:`SinkHealth`; the in-memory
    (:func:`measure_sink`) and the streamed (:mod:`secompress.sink_meter`) measurements both end here."""
    L = num_layers
    return SinkHealth([rec.hidden_max.get(l, math.nan) for l in range(L)],
                      [rec.hidden_first_max.get(l, math.nan) for l in range(L)],
                      [float(np.mean(rec.hidden_median[l])) if l in rec.hidden_median else math.nan for l in range(L)],
                      [float(np.mean(rec.sink_mass[l])) if rec.sink_mass.get(l) else math.nan for l in range(L)])


@torch.no_grad()
def measure_sink(model: nn.Module, ids: torch.Tensor, batch_size: int = SINK_BATCH_SIZE) -> SinkHealth:
    """Sink health of ``model`` on windows ``ids [N, S]`` (attention switched to eager meanwhile),
    ``batch_size`` windows per forward (the median |h| and the sink mass are per-batch means)."""
    from .profile import _eager_attention

    adapter = check_model(model)
    rec = Recorder(seq_len=ids.shape[1])
    base = model.get_submodule(adapter.layers_path.rpartition(".")[0])
    dev = next(model.parameters()).device
    with _eager_attention(model, True), instrument(model, adapter, rec, attention=True, experts=False):
        for chunk in ids.split(batch_size):
            base(input_ids=chunk.to(dev), use_cache=False)
    return sink_health(rec, len(adapter.layers(model)))


def check_sink(baseline: SinkHealth, compressed: SinkHealth, threshold: float, label: str = "compressed") -> None:
    """SinkHealthError when the compressed model's peak massive ratio or mean sink mass is below
    ``threshold`` x the baseline's."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the sink threshold must be in (0, 1], got {threshold}")
    bad = []
    for name, b, c in (("peak massive ratio", baseline.peak_ratio, compressed.peak_ratio),
                       ("mean attention mass on token 0", baseline.mean_sink_mass, compressed.mean_sink_mass)):
        if math.isfinite(b) and b > 0 and not (c >= threshold * b):
            bad.append(f"{name} {c:.4g} vs baseline {b:.4g} ({c / b:.2f}x)")
    if bad:
        raise SinkHealthError(f"the {label} model lost its attention sink (below {threshold} x the baseline): "
                              + "; ".join(bad))
    log.info("sink check passed for the %s model (threshold %s)", label, threshold)


def sink_markdown(cols: dict[str, SinkHealth]) -> str:
    """Per-layer massive ratio and sink mass, one column pair per model, plus the summary row."""
    names = list(cols)
    head = "| layer | " + " | ".join(f"massive ratio ({n}) | sink mass ({n})" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    L = len(next(iter(cols.values())).sink_mass)
    f = lambda v: "n/a" if not math.isfinite(v) else f"{v:.4g}"
    for l in range(L):
        lines.append(f"| {l} | " + " | ".join(f"{f(cols[n].massive_ratio[l])} | {f(cols[n].sink_mass[l])}"
                                              for n in names) + " |")
    lines.append("| peak / mean | " + " | ".join(f"{f(cols[n].peak_ratio)} | {f(cols[n].mean_sink_mass)}"
                                                 for n in names) + " |")
    return "\n".join(lines)


def plot_sink(cols: dict[str, SinkHealth], path: str | Path, title: str = "") -> Path:
    """Two panels over the decoder layers: massive ratio (log) and attention mass on token 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-o", "--s", ":^", "-.d", "-x", "--v"]
    for i, (name, h) in enumerate(cols.items()):
        x = range(len(h.sink_mass))
        a.plot(x, h.massive_ratio, styles[i % len(styles)], label=name)
        b.plot(x, h.sink_mass, styles[i % len(styles)], label=name)
    a.set_yscale("log")
    a.set_xlabel("decoder layer (output of)")
    a.set_ylabel("first-token max |h| / median |h|")
    a.set_title("massive activation ratio")
    b.set_xlabel("decoder layer")
    b.set_ylabel("attention mass on token 0")
    b.set_title("attention sink")
    b.set_ylim(bottom=0)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def save_sink(cols: dict[str, SinkHealth], out: Path) -> list[Path]:
    """``sink.json``, ``sink.md`` and ``sink.png`` in ``out``."""
    (out / "sink.json").write_text(json.dumps({n: h.to_json() for n, h in cols.items()}, indent=1))
    (out / "sink.md").write_text(sink_markdown(cols) + "\n")
    return [out / "sink.json", out / "sink.md", plot_sink(cols, out / "sink.png")]
