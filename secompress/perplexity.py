"""Held-out loss and perplexity of a causal LM over token windows."""
from __future__ import annotations

import math

import torch


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of [B, S, V] logits on their [B, S] ids, and the token count."""
    target = input_ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             target.reshape(-1), reduction="sum")
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss: the model produces NaN/inf logits")
    return float(loss), target.numel()


@torch.no_grad()
def mean_loss(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over [N, S] windows, every window weighted by its
    S-1 predicted tokens. The first token of each window is context only."""
    total, count = 0.0, 0
    for chunk in input_ids.split(batch_size):
        chunk = chunk.to(model.device)
        loss, n = nll_sum(model(input_ids=chunk).logits, chunk)
        total += loss
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return total / count


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(mean_loss(model, input_ids, batch_size))
