"""Writing and reading a profile: super_experts.json, expert_stats.csv, plots, console table."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .outputs import atomic_dir
from .profile import SCHEMA_VERSION, ProfileResult
from .se_rule import SERule

log = logging.getLogger(__name__)
EXPERT_FIELDS = ("out_max", "out_channel", "out_pos", "in_max", "tokens", "gate_sum", "norm_sum", "gated_norm_sum")
LAYER_FIELDS = ("hidden_max", "hidden_first_max", "hidden_median", "sink_mass")


def _se_entry(r: ProfileResult, l: int, c: int) -> dict:
    a = r.arrays
    return {"layer": l, "expert": r.expert_label(c), "output_max": float(a["out_max"][l, c]),
            "channel": int(a["out_channel"][l, c]), "position": int(a["out_pos"][l, c]),
            "input_max": float(a["in_max"][l, c]), "tokens": int(a["tokens"][l, c])}


def disagreements(r: ProfileResult) -> dict:
    a, n = set(r.super_experts), set(r.super_experts_normalised)
    return {"only_absolute": [_se_entry(r, l, c) for l, c in sorted(a - n)],
            "only_normalised": [_se_entry(r, l, c) for l, c in sorted(n - a)]}


def dead_experts(r: ProfileResult) -> list[dict]:
    """Experts of MoE layers that no calibration token reached: nothing is known about them (their
    statistics are empty), and calibration-based quantization (GPTQ) has no data for them."""
    tokens = r.arrays["tokens"]  # [L, C]
    cols = r.num_experts + (1 if r.has_shared else 0)
    return [{"layer": int(l), "expert": r.expert_label(c)} for l in r.moe_layers for c in range(cols)
            if tokens[l, c] == 0]


def to_json(r: ProfileResult) -> dict:
    ratios = r.massive_ratios()
    return {
        "schema_version": SCHEMA_VERSION,
        "model": r.model, "model_type": r.model_type, "timestamp": r.timestamp,
        "num_layers": r.num_layers, "num_experts": r.num_experts, "moe_layers": r.moe_layers,
        "has_shared_expert": r.has_shared,
        "data": {"source": r.data_source, "sha256": r.data_sha256, "num_tokens": r.num_tokens},
        "rule": {"name": "su2025", "paper": "arXiv:2507.23279", **asdict(r.rule),
                 "considered_layers": r.rule.considered_layers(r.num_layers)},
        "super_experts": [_se_entry(r, l, c) for l, c in r.super_experts],
        "super_experts_layer_normalised": [_se_entry(r, l, c) for l, c in r.super_experts_normalised],
        "evidence": r.evidence().to_json(),
        "rule_disagreements": disagreements(r),
        "dead_experts": dead_experts(r),
        "layers": [{"layer": l, **{k: _num(r.arrays[k][l]) for k in LAYER_FIELDS},
                    "massive_ratio": _num(ratios[l])} for l in range(r.num_layers)],
    }


def _num(x):
    return None if x is None or not np.isfinite(x) else float(x)


def write_csv(r: ProfileResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "expert", *EXPERT_FIELDS, "is_super_expert", "is_super_expert_normalised"])
        a, ses, sesn = r.arrays, set(r.super_experts), set(r.super_experts_normalised)
        for l in r.moe_layers:
            for c in range(r.num_experts + (1 if r.has_shared else 0)):
                w.writerow([l, r.expert_label(c), *[a[k][l, c].item() for k in EXPERT_FIELDS],
                            int((l, c) in ses), int((l, c) in sesn)])


def plot(r: ProfileResult, out: Path) -> list[Path]:
    """A layers x experts heatmap of max |down_proj output| and per-layer line plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = r.arrays["out_max"]  # [L, C]
    cols = r.num_experts + (1 if r.has_shared else 0)
    fig, ax = plt.subplots(figsize=(max(6, cols * 0.35 + 2), max(3, r.num_layers * 0.35 + 1.5)))
    im = ax.imshow(np.log10(np.where(np.isfinite(v[:, :cols]) & (v[:, :cols] > 0), v[:, :cols], np.nan)),
                   aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 max |down_proj output|")
    for l, c in r.super_experts:
        ax.add_patch(plt.Rectangle((c - 0.5, l - 0.5), 1, 1, fill=False, ec="cyan", lw=2))
    ax.set_xlabel("expert" + (" (last column: shared)" if r.has_shared else "") + "; white: no token routed")
    ax.set_ylabel("layer")
    n = r.rule.considered_layers(r.num_layers)
    ax.axhline(n - 0.5, color="white", ls="--", lw=1)
    ax.set_title(f"{Path(r.model).name}: Super Experts boxed (rule on layers < {n})")
    fig.tight_layout()
    heat = out / "se_heatmap.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    L = np.arange(r.num_layers)
    a1.plot(L, np.nanmax(np.where(np.isfinite(v), v, np.nan), axis=1), "o-", label="max |down_proj out|")
    a1.plot(L, r.arrays["hidden_max"], "s-", label="max |hidden|")
    a1.plot(L, r.arrays["hidden_median"], "^-", label="median |hidden|")
    a1.set_yscale("log")
    a1.set_xlabel("layer")
    a1.legend(fontsize=8)
    a1.set_title("activations per layer")
    sink = r.arrays["sink_mass"]  # [L]
    a2.plot(L, sink, "o-", color="C3")
    for x, y in zip(L, sink):
        if np.isfinite(y):
            a2.annotate(f"{y:.3f}", (x, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7)
    a2.margins(y=0.2)  # autoscaled: sink masses can be a few hundredths
    a2.set_xlabel("layer")
    a2.set_ylabel("mean attention probability")
    a2.set_title("attention mass on the first token")
    fig.tight_layout()
    lines = out / "layers.png"
    fig.savefig(lines, dpi=120)
    plt.close(fig)
    return [heat, lines]


def summary_table(r: ProfileResult) -> str:
    """A plain-text table for the console."""
    rows = [f"model {r.model} ({r.model_type}), {r.num_layers} layers, {r.num_experts} experts"
            f"{' + shared' if r.has_shared else ''}, {r.num_tokens} calibration tokens",
            f"rule: first {r.rule.considered_layers(r.num_layers)} layers, > P{r.rule.percentile} and "
            f"> {r.rule.max_ratio} x max",
            f"{'rule':<12}{'layer':>6}{'expert':>8}{'out max':>12}{'channel':>9}{'pos':>6}{'tokens':>8}"]
    for label, ses in (("absolute", r.super_experts), ("normalised", r.super_experts_normalised)):
        for l, c in ses:
            e = _se_entry(r, l, c)
            rows.append(f"{label:<12}{l:>6}{str(e['expert']):>8}{e['output_max']:>12.2f}{e['channel']:>9}"
                        f"{e['position']:>6}{e['tokens']:>8}")
        if not ses:
            rows.append(f"{label:<12}{'(none)':>6}")
    ev = r.evidence()
    rows.append(f"evidence: {ev.why}")
    dead = dead_experts(r)
    if dead:
        shown = ", ".join(f"{d['layer']}/{d['expert']}" for d in dead[:12]) + (" ..." if len(dead) > 12 else "")
        rows.append(f"dead experts (no calibration token; layer/expert): {len(dead)}: {shown}")
    ratios = r.massive_ratios()
    rows.append("layer  max|h|  first-token max|h| / median  sink mass")
    for l in range(r.num_layers):
        rows.append(f"{l:>5}  {r.arrays['hidden_max'][l]:>7.2f}  {ratios[l]:>27.1f}  {r.arrays['sink_mass'][l]:>9.3f}")
    return "\n".join(rows)


def save_profile(r: ProfileResult, out: str | Path, overwrite: bool = False, plots: bool = True) -> Path:
    """Write super_experts.json, expert_stats.csv, arrays.npz and plots atomically into ``out``."""
    with atomic_dir(out, overwrite) as tmp:
        write_profile(r, tmp, plots)
    return Path(out)


PROFILE_DIR = "profile"  # where `secompress prune` stores the pruned checkpoint's renumbered profile


def write_profile(r: ProfileResult, folder: Path, plots: bool = True) -> None:
    """The profile's files into ``folder`` (created; a temporary folder's subfolder, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "super_experts.json").write_text(json.dumps(to_json(r), indent=2))
    write_csv(r, folder / "expert_stats.csv")
    np.savez_compressed(folder / "arrays.npz", **r.arrays)
    if plots:
        plot(r, folder)


def load_profile(path: str | Path) -> ProfileResult:
    """Read a profile directory (or its super_experts.json) written by :func:`save_profile`."""
    path = Path(path)
    d = path if path.is_dir() else path.parent
    meta = json.loads((d / "super_experts.json").read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{d}: profile schema {meta.get('schema_version')} != supported {SCHEMA_VERSION}")
    with np.load(d / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    E = meta["num_experts"]
    col = lambda e: E if e["expert"] == "shared" else int(e["expert"])
    rule = SERule(**{k: meta["rule"][k] for k in ("layer_fraction", "percentile", "max_ratio")})
    return ProfileResult(
        model=meta["model"], model_type=meta["model_type"], num_experts=E, moe_layers=meta["moe_layers"],
        has_shared=meta["has_shared_expert"], rule=rule, data_source=meta["data"]["source"],
        data_sha256=meta["data"]["sha256"], num_tokens=meta["data"]["num_tokens"], arrays=arrays,
        super_experts=[(e["layer"], col(e)) for e in meta["super_experts"]],
        super_experts_normalised=[(e["layer"], col(e)) for e in meta["super_experts_layer_normalised"]],
        timestamp=meta["timestamp"])
