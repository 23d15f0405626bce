"""The explicit registry of architecture adapters, keyed by ``config.model_type``."""
from __future__ import annotations

from ..errors import UnsupportedModelError
from . import deepseek_v2, deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoEAdapter

ADAPTERS: dict[str, MoEAdapter] = {}


def register(adapter: MoEAdapter) -> MoEAdapter:
    if adapter.model_type in ADAPTERS:
        raise ValueError(f"an adapter for model_type '{adapter.model_type}' is already registered")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


for _mod in (qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v2, deepseek_v3, gpt_oss):
    register(_mod.ADAPTER)


def get_adapter(config) -> MoEAdapter:
    """The adapter for a transformers config (or a model_type string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not a supported MoE architecture. "
            f"Supported: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "MoEAdapter", "get_adapter", "register"]
