"""secompress: Super-Expert-aware compression of Mixture-of-Experts language models."""
from __future__ import annotations

import logging

from .adapters import ADAPTERS, MoEAdapter, get_adapter
from .errors import (CalibrationError, MissingExtraError, OutputExistsError, SecompressError,
                     UnsupportedModelError)
from .loading import load
from .native import bound_onednn_caches
from .profile import ProfileConfig, ProfileResult, profile
from .profile_io import load_profile, save_profile
from .se_rule import SERule, find_super_experts

__version__ = "0.1.0"
bound_onednn_caches()  # read when oneDNN compiles its first kernel, not at import: secompress/native.py
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ADAPTERS", "CalibrationError", "MissingExtraError", "MoEAdapter", "OutputExistsError", "ProfileConfig",
    "ProfileResult", "SERule", "SecompressError", "UnsupportedModelError", "find_super_experts", "get_adapter",
    "load", "load_profile", "profile", "save_profile",
]
