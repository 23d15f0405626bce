"""Mixtral: routed experts; checkpoints use the legacy block_sparse_moe / w1,w3,w2 names."""
from .base import MoEAdapter

ADAPTER = MoEAdapter(
    model_type="mixtral",
    intermediate_key="intermediate_size",
    num_experts_key="num_local_experts",
    legacy_config_keys=(("num_local_experts", "num_local_experts"),),
    ckpt_block="block_sparse_moe",
    ckpt_expert_names=("w1", "w3", "w2"),
)
