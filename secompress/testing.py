"""Tiny random MoE models of every supported architecture, for tests and benchmarks.

Built from transformers configs, saved as safetensors with the local byte tokenizer:
nothing is downloaded. ``plant_super_expert`` scales one output channel of one
expert's down_proj so that it emits a massive outlier, as a Super Expert does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .adapters import get_adapter
from .bytetok import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer
from .experts import layout_of

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                 first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=16, num_key_value_heads=4, head_dim=8)

TINY: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=True),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY[model_type], **overrides})


def make_tiny(model_type: str, seed: int = 0, **overrides):
    """A random tiny model of ``model_type`` (float32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def save_tiny(model, path: str | Path) -> Path:
    """Save a tiny model as safetensors together with the byte tokenizer."""
    path = Path(path)
    model.save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def plant_super_expert(model, layer: int, expert: int | str, channel: int = 7, scale: float = 300.0) -> None:
    """Make (layer, expert) emit a massive outlier on ``channel`` of its down_proj output.

    ``expert`` is a routed-expert index or ``"shared"``.
    """
    adapter = get_adapter(model.config)
    block = adapter.block_of(adapter.layers(model)[layer])
    if block is None:
        raise ValueError(f"layer {layer} has no MoE block")
    if expert == "shared":
        adapter.shared_of(block).down_proj.weight[channel, :] *= scale
        return
    experts = adapter.experts_of(block)
    if layout_of(experts).transposed:
        experts.down_proj[expert][:, channel] *= scale  # [I, H]
    else:
        experts.down_proj[expert][channel, :] *= scale  # [H, I]
