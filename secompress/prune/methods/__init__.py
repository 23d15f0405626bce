"""The registry of prune methods: name -> :class:`~.base.PruneMethod` (one file per method family).

Adding a method: write ``methods/NAME.py`` with a :class:`~.base.PruneMethod` (``target``, ``plan``,
``step``, ``result``; its pure math in ``secompress/prune/``) and add it to the list below.
``PruneConfig(method=NAME)``, ``secompress prune --method NAME``, recipes' ``prune: {method: NAME}``
and both layer sources (in memory and streamed) then find it.
"""
from __future__ import annotations

from ..scores import SCORERS
from .base import CALIB, MethodPlan, PruneMethod
from .dern import Dern
from .heapr import Heapr
from .merge import HCSMOE, MSMOE
from .naee import Naee
from .premoe import PreMoe
from .score import ScoreRemoval
from .stun import Stun
from .uncurl import Uncurl

PRUNE_METHODS: dict[str, PruneMethod] = {}


def register(method: PruneMethod) -> PruneMethod:
    """Add ``method`` under its name; a name taken already is an error."""
    if not isinstance(method, PruneMethod):
        raise TypeError(f"a prune method is a secompress.prune.methods.base.PruneMethod, got {type(method).__name__}")
    if method.name in PRUNE_METHODS:
        raise ValueError(f"prune method '{method.name}' is registered already")
    PRUNE_METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    del PRUNE_METHODS[name]


for _m in (*(ScoreRemoval(n) for n in sorted(SCORERS)), Naee(), MSMOE, HCSMOE, Heapr(),  # the built-ins, CLI order
           PreMoe(), Uncurl(), Dern(), Stun()):
    register(_m)

__all__ = ["CALIB", "MethodPlan", "PRUNE_METHODS", "PruneMethod", "register", "unregister"]
