"""PreMoe, pure math: the task-conditioned expected selection score and pattern retrieval.

PreMoe (Pei, Zhang, Zhen, Yu, Liu, Pan, Yuan, Yu 2025, "PreMoe: Lightening MoEs on Constrained
Memory by Expert Pruning and Retrieval", arXiv 2505.17639; reference code github.com/JarvisPei/PreMoe)
has two parts:

- **Probabilistic expert pruning (PEP)** by the *task-conditioned expected selection score* (TCESS),
  computed from router logits on a task's calibration tokens. Per token t, the router's top-k
  logits are taken; with a confidence threshold r, only those whose probability among the top-k
  (softmax over the k selected logits) is >= r count; a counted expert's marker is its logit, every
  other expert's 0. TCESS of expert e is the marker averaged over the task's tokens:

      TCESS_e = 1/T sum_t 1[e in topk_t and softmax(topk logits_t)_e >= r] * logit_te

  (the reference code's ``markers``; its demo uses k = 1 and no threshold). Each layer keeps the
  experts with the highest TCESS.
- **Task-adaptive expert retrieval (TAER)**: each task's TCESS vectors are stored as its compact
  expert pattern; a query's TCESS (from its own tokens) is matched to the nearest stored pattern
  (L2, as the reference code's FAISS ``IndexFlatL2``) and that task's pruned variant is used. The
  reference code matches on the first MoE layer only (its router depends on no expert, so a variant
  can be chosen before any expert is loaded); matching on every MoE layer is the other option here.

A selected expert's marker is its raw logit, as in the reference code; on the bundled reference
model over 97% of the selected top-2 logits are positive, so a rarely selected expert scores near 0
and a never selected one exactly 0. Routers that select by a transformed or biased score
(DeepSeek-V3: sigmoid, correction bias, groups) are ranked by their raw logits' top-k here too, as
the reference code (written for DeepSeek-R1) does.
Legend: T tokens, E experts, K top-k, P stored patterns, D pattern length.
"""
from __future__ import annotations

import torch


def tcess_sum(logits: torch.Tensor, k: int, r: float = 0.0) -> torch.Tensor:
    """sum_t of the TCESS markers of ``logits [T, E]`` -> [E] (float64); divide by T for TCESS."""
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"logits must be [tokens, experts] with 1 <= k <= experts, got {tuple(logits.shape)}, k={k}")
    lg = logits.double()
    top, idx = lg.topk(k, dim=-1)  # [T, K]
    keep = torch.softmax(top, dim=-1) >= r  # [T, K]
    markers = torch.zeros_like(lg).scatter_(1, idx, torch.where(keep, top, torch.zeros_like(top)))  # [T, E]
    return markers.sum(0)


def tcess(logits: torch.Tensor, k: int, r: float = 0.0) -> torch.Tensor:
    """TCESS [E] of one layer from the router logits ``[T, E]`` of a task's tokens."""
    return tcess_sum(logits, k, r) / max(1, logits.shape[0])


def nearest_pattern(query: torch.Tensor, bank: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Index of the stored pattern nearest to ``query [D]`` among ``bank [P, D]`` (L2; ties: lower
    index) and the distances [P]."""
    if bank.ndim != 2 or query.ndim != 1 or bank.shape[1] != query.shape[0]:
        raise ValueError(f"query [D] and bank [P, D] must agree, got {tuple(query.shape)} and {tuple(bank.shape)}")
    d = (bank.double() - query.double()).norm(dim=1)  # [P]
    return int(torch.argmin(d)), d
