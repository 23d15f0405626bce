"""Expert-importance scores: pure functions over collected statistics.

Each scorer maps the per-(layer, expert) statistics of a profile (numpy arrays
[L, E], as in :attr:`secompress.profile.ProfileResult.arrays` without the shared
column) to an importance [L, E]: higher means more important, and pruning removes
the lowest. Dense layers (NaN or -1 in the statistics) give NaN; callers only look
at MoE layers. No torch modules, hooks or files here.

Statistics used (sums over the calibration tokens routed to the expert):
  tokens          routed-token count
  gate_sum        sum of routing weights
  norm_sum        sum of ||expert output||_2
  gated_norm_sum  sum of routing weight x ||expert output||_2
Legend: L decoder layers, E routed experts.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Stats = Mapping[str, np.ndarray]  # name -> [L, E]
Scorer = Callable[[Stats, int], np.ndarray]  # (stats, seed) -> importance [L, E]

SCORERS: dict[str, Scorer] = {}


def register(name: str) -> Callable[[Scorer], Scorer]:
    """Add a scorer to :data:`SCORERS`; a name registered twice is an error."""
    def deco(fn: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"a scorer named '{name}' is already registered")
        SCORERS[name] = fn
        return fn
    return deco


def _get(stats: Stats, key: str) -> np.ndarray:
    if key not in stats:
        raise KeyError(f"the statistics lack '{key}' (have: {sorted(stats)}); profile the model first")
    a = np.asarray(stats[key], dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"statistic '{key}' must be [layers, experts], got shape {a.shape}")
    return a


def _dense_rows_nan(score: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """NaN where the statistics mark no expert (dense layers: tokens is -1 or NaN)."""
    return np.where(np.isfinite(tokens) & (tokens >= 0), score, np.nan)


@register("frequency")
def frequency(stats: Stats, seed: int = 0) -> np.ndarray:
    """Routing frequency: the number of calibration tokens routed to the expert.

    The classic count-based criterion (e.g. Muzio et al. 2024, "SEER-MoE", and the
    frequency baseline of Lu et al. 2024, "Not All Experts are Equal"): rarely
    chosen experts are assumed to matter least.
    """
    tokens = _get(stats, "tokens")  # [L, E]
    return _dense_rows_nan(tokens.copy(), tokens)


@register("reap")
def reap(stats: Stats, seed: int = 0) -> np.ndarray:
    """REAP (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning").

    The mean, over the tokens routed to the expert, of routing weight x ||expert
    output||_2, i.e. ``gated_norm_sum / tokens``. An expert no token reached scores 0.
    """
    tokens, g = _get(stats, "tokens"), _get(stats, "gated_norm_sum")  # [L, E]
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(tokens > 0, g / np.where(tokens > 0, tokens, 1), 0.0)
    return _dense_rows_nan(score, tokens)


@register("easy_ep")
def easy_ep(stats: Stats, seed: int = 0) -> np.ndarray:
    """EASY-EP output-aware expert importance (Dong et al. 2025, "Domain-Specific
    Pruning of Large Mixture-of-Experts Models with Few-shot Demonstrations").

    Gate score x ||expert output||_2 summed over the calibration tokens, i.e.
    ``gated_norm_sum``. Unlike REAP, which averages over the tokens an expert
    receives, the sum also grows with how often the expert is chosen, so a rarely
    routed expert scores low even when its few outputs are large. (EASY-EP also
    weights each token by a token-contribution estimate, the dissimilarity of the
    hidden state before and after the layer; that weighting is not collected by the
    profiler and is left out here.)
    """
    tokens, g = _get(stats, "tokens"), _get(stats, "gated_norm_sum")  # [L, E]
    return _dense_rows_nan(np.where(tokens > 0, g, 0.0), tokens)


@register("random")
def random(stats: Stats, seed: int = 0) -> np.ndarray:
    """Seeded uniform random importance: the baseline every criterion must beat
    (as in Lu et al. 2024 and Lasby et al. 2025)."""
    tokens = _get(stats, "tokens")  # [L, E]
    score = np.random.default_rng(seed).random(tokens.shape)
    return _dense_rows_nan(score, tokens)


def score(method: str, stats: Stats, seed: int = 0) -> np.ndarray:
    """Importance [L, E] by the registered scorer ``method``."""
    if method not in SCORERS:
        raise ValueError(f"unknown scoring method '{method}'; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[method](stats, seed)
