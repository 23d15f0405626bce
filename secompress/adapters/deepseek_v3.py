"""DeepSeek-V3 / R1: shared experts, dense first layers, grouped routing, score-correction bias."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="deepseek_v3",
    num_experts_key="n_routed_experts",
    shared_expert="shared_experts",
    shared_width_multiplier_key="n_shared_experts",  # shared MLP width = moe_intermediate_size x this
    router_per_expert=("e_score_correction_bias",),
    group_keys=("n_group", "topk_group"),
    min_experts_per_group=2,  # the router scores a group by the sum of its top-2 experts
    legacy_config_keys=(("n_routed_experts", "n_routed_experts"),),
    extra_layers_key="num_nextn_predict_layers",  # the MTP layer(s) stored after the decoder layers
)
