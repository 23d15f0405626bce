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
