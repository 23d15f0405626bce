"""The dtype names the CLI, the recipes and the configs accept, and their default.

The table itself is :data:`secompress.checkpoints.DTYPES` (with ``"auto"``: the checkpoint's
own dtype, resolved by :func:`secompress.checkpoints.resolve_dtype`); every entry point
validates against it here, before anything is loaded.
"""
from __future__ import annotations

from .checkpoints import DTYPE_CHOICES

DEFAULT_DTYPE = "auto"  # of every entry point (CLI, recipe, ProfileConfig): the checkpoint's own


def check_dtype(name, what: str = "dtype") -> None:
    if name not in DTYPE_CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
