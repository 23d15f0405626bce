"""Pure math over collected statistics: the Super-Expert rule and its variants.

No torch modules, hooks or files here: inputs are arrays, outputs are arrays or lists.
Legend: L decoder layers, C columns (E routed experts + 1 shared slot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SERule:
    """Thresholds of the Super-Expert rule (Su et al. 2025, arXiv 2507.23279, Sec. 3).

    An expert is a Super Expert when its max |down_proj output| over the calibration
    data is above the ``percentile``-th percentile of all such maxima in the first
    ``layer_fraction`` of the decoder layers, and above ``max_ratio`` times their max.
    """

    layer_fraction: float = 0.75
    percentile: float = 99.5
    max_ratio: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.layer_fraction <= 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if not 0.0 <= self.max_ratio <= 1.0:
            raise ValueError(f"max_ratio must be in [0, 1], got {self.max_ratio}")

    def considered_layers(self, num_layers: int) -> int:
        """How many leading decoder layers the rule looks at (at least one)."""
        return max(1, math.floor(self.layer_fraction * num_layers))


def find_super_experts(values: np.ndarray, rule: SERule = SERule(), normalise: bool = False
                       ) -> list[tuple[int, int]]:
    """(layer, column) of every Super Expert.

    values: [L, C] max |down_proj output| per (layer, expert); NaN where a layer has
    no such expert (dense layers, no shared expert). With ``normalise`` each layer's
    values are divided by that layer's median first (the layer-normalised variant:
    it removes the growth of the residual stream with depth, which in shallow models
    makes the absolute rule favour deep experts).
    """
    v = np.asarray(values, dtype=np.float64).copy()  # [L, C]
    if v.ndim != 2:
        raise ValueError(f"values must be [layers, experts], got shape {v.shape}")
    if normalise:
        finite = np.isfinite(v)
        med = np.array([[np.median(row[ok]) if ok.any() else np.nan] for row, ok in zip(v, finite)])  # [L, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            v = v / np.where(med > 0, med, np.nan)
    n = rule.considered_layers(v.shape[0])
    head = v[:n]
    pool = head[np.isfinite(head)]
    if pool.size == 0:
        return []
    p = np.percentile(pool, rule.percentile)
    top = pool.max()
    hits = np.argwhere(np.isfinite(head) & (head > p) & (head > rule.max_ratio * top))
    return sorted((int(l), int(c)) for l, c in hits)


def massive_ratio(first_max: float, median: float) -> float:
    """Massive-activation ratio: max |h| at the first token over the median |h|."""
    return float(first_max / median) if median > 0 else float("inf")


WEAK_LAYER_RATIO = 10.0  # an SE's max |down_proj output| over its layer's median expert max, below: weak
WEAK_MASSIVE_RATIO = 20.0  # the model's peak first-token max|h| / median|h|, below: no massive activation


@dataclass(frozen=True)
class Evidence:
    """How strongly the statistics support the SE verdict. Super Experts are rare outliers whose output
    is tens to thousands of times their layer's typical expert (the reference model's: 39x, with a
    first-token massive ratio of ~200); in a random-weight model the rule still flags the largest
    value of a flat distribution (~1.3x, massive ratio ~8)."""

    layer_ratios: tuple[float, ...]  # per SE (in verdict order): its output max / its layer's median
    massive_ratio: float  # peak over layers of first-token max|h| / median|h|
    weak: bool
    why: str

    def to_json(self) -> dict:
        return {"se_over_layer_median": [round(x, 3) for x in self.layer_ratios],
                "peak_massive_ratio": round(self.massive_ratio, 3), "weak": self.weak, "why": self.why}


def se_evidence(values: np.ndarray, ses, massive_ratios: np.ndarray) -> Evidence:
    """The :class:`Evidence` for ``ses`` ([(layer, column)]) found in ``values`` [L, C] (max |down_proj
    output|), given each layer's massive ratio [L]."""
    v = np.asarray(values, dtype=np.float64)
    ratios = []
    for l, c in ses:
        row = v[l][np.isfinite(v[l]) & (v[l] > 0)]
        ratios.append(float(v[l, c] / np.median(row)) if row.size else float("nan"))
    m = np.asarray(massive_ratios, dtype=np.float64)
    peak = float(np.nanmax(m)) if np.isfinite(m).any() else float("nan")
    low = [f"{r:.1f}x" for r in ratios if not r >= WEAK_LAYER_RATIO]
    reasons = []
    if ses and low:
        reasons.append(f"the flagged experts' outputs are only {', '.join(low)} their layer's median expert "
                       f"(Super Experts stand {WEAK_LAYER_RATIO:g}x and more above it)")
    if not peak >= WEAK_MASSIVE_RATIO:
        reasons.append(f"the first-token massive ratio peaks at {peak:.1f} (models with Super Experts show "
                       f"{WEAK_MASSIVE_RATIO:g} and far more)")
    if not ses:
        return Evidence((), peak, False, "no Super Expert found")
    if reasons:
        return Evidence(tuple(ratios), peak, True, "weak evidence: " + "; ".join(reasons) +
                        ": this model may have no Super Expert (random or untrained weights?); protecting the "
                        "flagged experts costs little, but do not read the list as a finding")
    return Evidence(tuple(ratios), peak, False, f"strong: {min(ratios):.0f}x the layer median or more, massive "
                                                f"ratio {peak:.0f}")
