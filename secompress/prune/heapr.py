"""HEAPr neuron (atomic-expert) pruning, pure math.

HEAPr (2025, "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space") treats
every intermediate neuron j of a routed expert as an *atomic expert*: its gate/up rows and
its down_proj column ``w_j`` [H] write ``g_t * a_tj * w_j`` into the MoE layer's output at
token t (``g_t`` the routing weight, ``a_tj`` the neuron's activation). Removing it perturbs
the layer output by ``delta_t = -g_t a_tj w_j``; the second-order expansion of the loss in
that output space, with the Hessian replaced by the Fisher matrix of the output gradients
``G_t = dL/dy_t`` [H] (a converged model's first-order term averages out), gives

    score_j = 1/2 * sum_t (g_t a_tj <w_j, G_t>)^2

so one backward pass over the calibration tokens and per-neuron accumulators of size [E, I]
are all the statistics needed; the Hessian never has to be formed. Without gradients (a
forward-only engine) ``hessian="identity"`` uses H = I in the output space:
``score_j = 1/2 * ||w_j||^2 * sum_t (g_t a_tj)^2``.

Stock checkpoints hold one ``moe_intermediate_size``, so each expert keeps the same number
of neurons (its own highest-scoring ones); :func:`nonuniform_widths` says what a per-expert
width with the same total budget would keep instead.

Super Experts (Su et al. 2025, arXiv 2507.23279): the neurons that write the SE's massive
output channel on the massive token (:func:`massive_neurons`) are always kept when protected.
Legend: c tokens routed to an expert, E experts, I expert FFN size, H hidden size.
"""
from __future__ import annotations

import torch

HESSIANS = ("fisher", "identity")


@torch.no_grad()
def atomic_scores(act: torch.Tensor, gate: torch.Tensor, down: torch.Tensor, grad: torch.Tensor | None
                  ) -> torch.Tensor:
    """One expert's contribution to the HEAPr scores of its I neurons from c routed tokens.

    act [c, I] down_proj input, gate [c] routing weights, down [H, I] down_proj weight,
    grad [c, H] dL/d(MoE output) (None: identity Hessian) -> [I] (float64)."""
    ga = act.double() * gate.double()[:, None]  # [c, I]
    if grad is None:
        return 0.5 * ga.pow(2).sum(0) * down.double().pow(2).sum(0)  # [I]
    proj = grad.double() @ down.double()  # [c, I]: <w_j, G_t>
    return 0.5 * (ga * proj).pow(2).sum(0)


def massive_neurons(act: torch.Tensor, down_row: torch.Tensor, bias: float = 0.0, tol: float = 0.02
                    ) -> list[int]:
    """The fewest neurons that write an expert's massive output on its own.

    act [I] the expert's down_proj input on the massive token, down_row [I] the down_proj row of
    the massive channel. Contributions ``act_j * down_row_j`` sum (with ``bias``) to the channel's
    value; neurons are taken by |contribution|, largest first, until the kept ones alone give the
    value within ``tol`` (relative). Returns their indices, largest contribution first."""
    contrib = act.double() * down_row.double()  # [I]
    total = float(contrib.sum()) + bias
    order = torch.argsort(contrib.abs(), descending=True).tolist()
    acc, best, best_err = bias, len(order), float("inf")
    for n, j in enumerate(order, 1):
        acc += float(contrib[j])
        err = abs(total - acc)
        if err < best_err:
            best, best_err = n, err
        if err <= tol * abs(total):
            return order[:n]
    return order[:best]


def select_neurons(scores: torch.Tensor, width: int, protected: dict[int, list[int]] | None = None
                   ) -> torch.Tensor:
    """scores [E, I] -> kept neuron ids [E, width] (sorted): each expert's ``protected[e]`` neurons,
    then its highest scores (ties to the lower id)."""
    E, I = scores.shape
    if not 1 <= width <= I:
        raise ValueError(f"a kept width of {width} neurons is outside 1..{I}")
    keep = []
    for e in range(E):
        must = list(dict.fromkeys((protected or {}).get(e, [])))
        if len(must) > width:
            raise ValueError(f"expert {e} has {len(must)} protected neurons, more than the kept width {width}")
        order = sorted(range(I), key=lambda j: (-float(scores[e, j]), j))
        rest = [j for j in order if j not in set(must)]
        keep.append(sorted(must + rest[: width - len(must)]))
    return torch.tensor(keep, dtype=torch.long, device="cpu")


def nonuniform_widths(scores: torch.Tensor, width: int) -> torch.Tensor:
    """[E] per-expert widths if the layer's E*width neurons were chosen by score across all its
    experts (HEAPr's layer-wise ranking) instead of ``width`` per expert."""
    E, I = scores.shape
    top = torch.topk(scores.reshape(-1), E * width).indices  # [E*width]
    return torch.bincount(top // I, minlength=E)


def retained(scores: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of the layer's total score the kept neurons hold (keep [E, w] ids)."""
    total = float(scores.sum())
    return float(scores.gather(1, keep).sum()) / total if total > 0 else 1.0
