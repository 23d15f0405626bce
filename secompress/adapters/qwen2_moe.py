"""Qwen2-MoE / Qwen1.5-MoE: routed experts plus one shared expert behind a sigmoid gate."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="qwen2_moe",
    num_experts_key="num_experts",
    shared_expert="shared_expert",
    shared_expert_gate="shared_expert_gate",
    legacy_config_keys=(("num_experts", "num_experts"),),
)
