"""Bounds on torch's native CPU kernel caches, set before torch runs its first oneDNN kernel.

torch runs bf16/fp16 matmuls on the CPU through oneDNN, which keeps one compiled primitive per
distinct matmul shape in two caches: oneDNN's own (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and
ideep's (``LRU_CACHE_CAPACITY``), 1024 entries each by default. An MoE layer sends a different
number of tokens to each expert, so almost every expert matmul has a new shape and a new entry,
of about 1.6 MiB for a Qwen1.5-MoE expert projection ([M, 2048] x [2048, 1408], bf16). Measured on
this project's CPU box (torch 2.13.0): 400 distinct shapes grew resident memory by 638 MiB, and
a streamed pass over a 6-layer Qwen1.5-MoE-shape cut grew by ~100 MiB per decoder layer, none
of it freed at the end of the pass (``evals/results/bench_scale.txt``). With one entry per cache
the pass is flat and just as fast: a miss costs the same as before, and a run of same-shape
matmuls (a dense model, a fixed batch) still hits. (A capacity of 0 instead doubles the time of
repeated same-shape matmuls.)

:func:`bound_onednn_caches` runs when ``secompress`` is imported. The variables are read when
oneDNN first compiles a kernel, so they apply unless bf16 CPU matmuls ran before the import;
values already in the environment win. GPUs are not affected.
"""
from __future__ import annotations

import os

ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1", "LRU_CACHE_CAPACITY": "1"}


def bound_onednn_caches() -> dict[str, str]:
    """Set each cache capacity in :data:`ONEDNN_CACHES` unless the environment has one; returns
    the values in effect."""
    return {k: os.environ.setdefault(k, v) for k, v in ONEDNN_CACHES.items()}
