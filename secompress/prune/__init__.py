"""SE-protected expert pruning, merging and neuron pruning that change the model for real.

    from secompress.prune import PruneConfig, prune, save_pruned
    result = prune(model, tokenizer, PruneConfig(ratio=0.25, method="reap"))
    save_pruned(model, tokenizer, result, "out/")

Modules: ``methods/`` (the registry ``PRUNE_METHODS``: one file per method family, each handing
out its per-layer step), pure math (``scores`` (registry ``SCORERS``), ``select``, ``merge``,
``heapr``, ``reconstruction``, ``premoe_math``, ``uncurl_math``, ``dern_math``, ``stun_math``),
per-layer statistics and actions (``layer_stats``, ``seed_stats``, ``merging``, ``neurons``,
``premoe``, ``uncurl``, ``dern``, ``stun``, ``structural``), ``config`` (PruneConfig), ``result``
(the report), ``api`` (the in-memory stage; its export is the ``plain`` format,
:mod:`secompress.quant.formats.plain`, which writes FP8 checkpoints as stored), ``task_jobs``
(PreMoe's per-task variants and retrieval, UNCURL's threshold sweep and adaptive counts).
"""
from __future__ import annotations

from .api import PruneConfig, PruneResult, plan_for, prune, remap_profile, save_pruned, summary_table
from .methods import PRUNE_METHODS
from .scores import SCORERS
from .select import PrunePlan, ProtectionChange, Selection, select_by_score
from .structural import RemovalReport, remove_experts

__all__ = ["PRUNE_METHODS", "PruneConfig", "PrunePlan", "PruneResult", "ProtectionChange", "RemovalReport", "SCORERS",
           "Selection", "plan_for", "prune", "remap_profile", "remove_experts", "save_pruned", "select_by_score",
           "summary_table"]
