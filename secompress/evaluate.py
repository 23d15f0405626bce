"""Held-out loss and perplexity of a causal LM over token windows."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def mean_loss(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over [N, S] windows, every window weighted by its
    S-1 predicted tokens. The first token of each window is context only."""
    total, count = 0.0, 0
    for chunk in input_ids.split(batch_size):
        chunk = chunk.to(model.device)
        logits = model(input_ids=chunk).logits[:, :-1].float()  # [B, S-1, V]
        target = chunk[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss: the model produces NaN/inf logits")
        total += float(loss)
        count += target.numel()
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return total / count


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(mean_loss(model, input_ids, batch_size))
