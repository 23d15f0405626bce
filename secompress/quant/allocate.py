"""Bit allocation under an average bit-width budget, as an integer linear program.

Following MC-MoE (Huang et al. 2024, "Mixture Compressor for Mixture-of-Experts LLMs Gains
More", arXiv 2410.06270): one binary variable ``x[u, b]`` per unit u (an expert, or a whole
layer's experts) and candidate bit-width b,

    minimise    sum_u sum_b importance[u] * noise(b) * x[u, b]
    subject to  sum_b x[u, b] = 1                                   (one choice per unit)
                sum_u sum_b params[u] * b * x[u, b] <= target * sum_u params[u]   (budget)
                x[u, pinned[u]] = 1                                 (Super Experts, rules)

``noise(b) = 2^(-2b)``: the relative mean-squared error of uniform b-bit rounding (it falls
by 4x per extra bit); 16 bits (kept weights) give 2^-32, about zero. ``importance`` is
e.g. the routed-token frequency from a profile, so often-used experts get more bits.
Solved with ``scipy.optimize.milp`` (HiGHS). Legend: U units, B candidate bit-widths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import require


def noise(bits) -> np.ndarray:
    """Quantization-noise proxy 2^(-2b)."""
    return np.exp2(-2.0 * np.asarray(bits, dtype=float))


@dataclass(frozen=True)
class Allocation:
    bits: list[int]  # per unit, one of the candidates
    average: float  # parameter-weighted average bits achieved
    target: float
    objective: float  # sum importance * noise(bits)

    def to_json(self) -> dict:
        return {"average": self.average, "target": self.target, "objective": self.objective}


def allocate(importance, params, candidates=(2, 3, 4, 8, 16), target: float = 3.5,
             pinned: dict[int, int] | None = None) -> Allocation:
    """Bits per unit minimising importance-weighted noise with a parameter-weighted average <= target.

    ``importance [U] >= 0``, ``params [U] > 0``; ``pinned``: unit index -> bits it must get.
    Raises ValueError when no choice meets the target (below the smallest candidate, or
    too much pinned at high bits).
    """
    imp = np.asarray(importance, dtype=float)
    par = np.asarray(params, dtype=float)
    cand = sorted({int(b) for b in candidates})
    pinned = dict(pinned or {})
    U, B = len(imp), len(cand)
    if U == 0 or par.shape != (U,):
        raise ValueError(f"importance and params need the same non-zero length, got {U} and {par.shape}")
    if (imp < 0).any() or not np.isfinite(imp).all() or (par <= 0).any():
        raise ValueError("importance must be finite and >= 0, params > 0")
    for u, b in pinned.items():
        if b not in cand:
            raise ValueError(f"unit {u} is pinned to {b} bits, not a candidate {cand}")
    floor = (sum(par[u] * b for u, b in pinned.items()) +
             sum(par[u] * cand[0] for u in range(U) if u not in pinned)) / par.sum()
    if target < floor - 1e-9:
        why = f"the smallest candidate is {cand[0]} bits" if not pinned or target < cand[0] else \
            f"with {len(pinned)} unit(s) pinned (Super Experts at their bits) the least possible is {floor:.3f}"
        raise ValueError(f"average bit-width {target} is infeasible: {why}")
    opt = require("scipy.optimize", "dev", "bit allocation (avg_bits)")
    from scipy.optimize import Bounds, LinearConstraint

    imp = imp / imp.sum() if imp.sum() > 0 else np.full(U, 1.0 / U)
    c = (imp[:, None] * noise(cand)[None, :]).reshape(-1)  # [U*B]
    one = np.kron(np.eye(U), np.ones(B))  # [U, U*B]: one choice per unit
    budget = (par[:, None] * np.array(cand, dtype=float)[None, :]).reshape(1, -1)  # [1, U*B]
    lo, hi = np.zeros(U * B), np.ones(U * B)
    for u, b in pinned.items():
        hi[u * B:(u + 1) * B] = 0
        lo[u * B + cand.index(b)] = hi[u * B + cand.index(b)] = 1
    res = opt.milp(c, integrality=np.ones(U * B), bounds=Bounds(lo, hi),
                   constraints=[LinearConstraint(one, 1, 1),
                                LinearConstraint(budget, -np.inf, target * par.sum() + 1e-6 * par.sum())])
    if res.status != 0 or res.x is None:
        raise ValueError(f"bit allocation failed for target {target}: {res.message}")
    choice = np.asarray(res.x).reshape(U, B).argmax(1)
    bits = [cand[i] for i in choice]
    avg = float((par * np.array(bits)).sum() / par.sum())
    return Allocation(bits, avg, float(target), float((imp * noise(bits)).sum()))
