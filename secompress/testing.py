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
def plant_super_expert(model, layer: int, expert: int | str, channel: int = 7, scale: float = 300.0,
                       neuron: int | None = None) -> None:
    """Make (layer, expert) emit a massive outlier on ``channel`` of its down_proj output.

    ``expert`` is a routed-expert index or ``"shared"``. With ``neuron`` (routed experts) only
    that intermediate neuron's weight into ``channel`` is scaled, as in real SEs, where a few
    neurons write the massive channel.
    """
    adapter = get_adapter(model.config)
    block = adapter.block_of(adapter.layers(model)[layer])
    if block is None:
        raise ValueError(f"layer {layer} has no MoE block")
    if expert == "shared":
        adapter.shared_of(block).down_proj.weight[channel, :] *= scale
        return
    experts = adapter.experts_of(block)
    if neuron is not None:
        dn = experts.down_proj[expert]  # [H, I] (transposed: [I, H])
        idx = (neuron, channel) if layout_of(experts).transposed else (channel, neuron)
        dn[idx] = scale * dn.abs().max()
        return
    if layout_of(experts).transposed:
        experts.down_proj[expert][:, channel] *= scale  # [I, H]
    else:
        experts.down_proj[expert][channel, :] *= scale  # [H, I]


@torch.no_grad()
def to_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Turn a saved checkpoint into a block-scaled FP8 one laid out like DeepSeek-V3/R1 and Qwen3-FP8.

    Every 2D linear ``weight`` (attention, dense MLP, shared and per-expert projections, keys as
    stored) becomes ``float8_e4m3fn`` plus a float32 ``weight_scale_inv`` per ``block``;
    embeddings, ``lm_head``, routers, norms and biases stay as stored. config.json gets
    ``quantization_config: {quant_method: fp8, weight_block_size: block, ...}``. Use a block that
    does not divide the matrices (e.g. (16, 16) on a 24-row projection) to exercise partial blocks.
    """
    import json
    import shutil

    from safetensors.torch import save_file

    from . import fp8
    from .checkpoints import load_config
    from .streaming import Checkpoint, build_skeleton, disk_key

    src, dst = Path(src), Path(dst)
    config = load_config(src)
    skeleton = build_skeleton(config)
    adapter = get_adapter(config)
    keep = {disk_key(adapter, f"{adapter.block_path(i)}.{adapter.router}.weight")
            for i in adapter.moe_layer_indices(skeleton)}
    for emb in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings()):
        keep |= {disk_key(adapter, f"{n}.weight") for n, m in skeleton.named_modules() if m is emb}
    ckpt = Checkpoint(src)
    out = {}
    with ckpt.reading():
        for key in ckpt.where:
            t = ckpt.get_stored(key)
            if key.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and key not in keep:
                out[key], out[key + fp8.SCALE_SUFFIX] = fp8.quantize(t, block)
            else:
                out[key] = t
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": list(block),
                                  "modules_to_not_convert": sorted(k.rpartition(".")[0] for k in keep)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst
