"""DeepSeek-V2 / V2-Lite: shared experts, leading dense layers (first_k_dense_replace)."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="deepseek_v2",
    num_experts_key="n_routed_experts",
    shared_expert="shared_experts",
    shared_width_multiplier_key="n_shared_experts",  # shared MLP width = moe_intermediate_size x this
    group_keys=("n_group", "topk_group"),
    legacy_config_keys=(("n_routed_experts", "n_routed_experts"),),
)
