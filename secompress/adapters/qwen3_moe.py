"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts only."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="qwen3_moe",
    num_experts_key="num_experts",
    legacy_config_keys=(("num_experts", "num_experts"),),
)
