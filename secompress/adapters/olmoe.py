"""OLMoE (OLMoE-1B-7B): routed experts only."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="olmoe",
    intermediate_key="intermediate_size",
    num_experts_key="num_experts",
    legacy_config_keys=(("num_experts", "num_experts"),),
)
