"""GPT-OSS: router with bias, experts with biases, interleaved gate/up, transposed weights."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="gpt_oss",
    intermediate_key="intermediate_size",
    num_experts_key="num_local_experts",
    router="router",
    router_per_expert=("bias",),
    ckpt_fused_experts=True,
    legacy_config_keys=(("num_local_experts", "num_local_experts"),),
)
