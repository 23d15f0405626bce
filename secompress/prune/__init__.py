"""SE-protected expert pruning that removes experts for real.

    from secompress.prune import PruneConfig, prune, save_pruned
    result = prune(model, tokenizer, PruneConfig(ratio=0.25, method="reap"))
    save_pruned(model, tokenizer, result, "out/")

Modules: ``scores`` (importance from profile statistics, registry ``SCORERS``),
``reconstruction`` (NAEE), ``select`` (validated plan, SE-protected choice),
``structural`` (slicing tensors and config), ``api`` (the stage), ``cli``.
"""
from __future__ import annotations

from .api import PruneConfig, PruneResult, plan_for, prune, remap_profile, save_pruned, summary_table
from .scores import SCORERS
from .select import PrunePlan, ProtectionChange, Selection, select_by_score
from .structural import RemovalReport, remove_experts

__all__ = ["PruneConfig", "PrunePlan", "PruneResult", "ProtectionChange", "RemovalReport", "SCORERS", "Selection",
           "plan_for", "prune", "remap_profile", "remove_experts", "save_pruned", "select_by_score", "summary_table"]
