"""``PruneConfig``: what ``prune`` does, validated when it is built (before any model is loaded)."""
from __future__ import annotations

from dataclasses import dataclass

from ..profile import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .heapr import HESSIANS
from .methods import PRUNE_METHODS
from .reconstruction import DEFAULT_LIMIT
from .stun_math import PATTERNS, SIMILARITIES


@dataclass(frozen=True)
class PruneConfig:
    ratio: float  # share of each MoE layer's routed experts removed / merged away (heapr: of the expert width)
    method: str = "reap"  # a registered method: secompress.prune.methods.PRUNE_METHODS
    protect_super_experts: bool = True
    seed: int = 0  # the random scorer's seed
    calib_samples: int = DEFAULT_NUM_SAMPLES  # calibration windows (profiling, statistics)
    eval_samples: int = 8  # held-out windows for perplexity; 0 = no perplexity
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    naee_samples: int = 4  # of the calibration windows, how many NAEE reconstructs (its inputs are kept in memory)
    naee_limit: int = DEFAULT_LIMIT  # enumerate removal sets up to this many per layer, else greedy
    hessian: str = "fisher"  # HEAPr: output-space Hessian from gradients ("fisher") or "identity" (no backward)
    task_min_tokens: int = 2048  # premoe, uncurl: fewest calibration tokens the task data must give
    tcess_top_k: int = 0  # premoe: router logits per token that count in TCESS (0: the model's top_k)
    tcess_threshold: float = 0.0  # premoe: a selection counts if its softmax among the top-k is >= this
    dern_threshold: float = 0.3  # dern: a neuron segment less similar (cosine) to every kept neuron is left out
    stun_sparsity: float = 0.5  # stun: share of each kept expert's weights zeroed in stage 2 (0: stage 1 only)
    stun_pattern: str = "2:4"  # stun: "2:4" or "unstructured"
    stun_similarity: str = "router"  # stun: behaviour distance from router rows, or "coact" (co-selection counts)

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must be in (0, 1) (the share of routed experts to remove), got {self.ratio}")
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"unknown method '{self.method}'; known: {', '.join(PRUNE_METHODS)}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got '{self.hessian}'")
        if self.calib_samples < 1 or self.eval_samples < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("calib_samples and batch_size must be >= 1, eval_samples >= 0, seq_len >= 2")
        if self.naee_samples < 1 or self.naee_limit < 1:
            raise ValueError("naee_samples and naee_limit must be >= 1")
        if self.task_min_tokens < 1 or self.tcess_top_k < 0 or not 0.0 <= self.tcess_threshold <= 1.0:
            raise ValueError("task_min_tokens must be >= 1, tcess_top_k >= 0 and tcess_threshold in [0, 1]")
        if self.stun_pattern not in PATTERNS or self.stun_similarity not in SIMILARITIES:
            raise ValueError(f"stun_pattern must be one of {PATTERNS} and stun_similarity one of {SIMILARITIES}")
        if not 0.0 <= self.stun_sparsity < 1.0 or not -1.0 <= self.dern_threshold <= 1.0:
            raise ValueError("stun_sparsity must be in [0, 1) and dern_threshold (a cosine) in [-1, 1]")

    @property
    def prune_method(self):
        """The registered :class:`~secompress.prune.methods.base.PruneMethod`."""
        return PRUNE_METHODS[self.method]
