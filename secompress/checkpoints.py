"""Loading checkpoints: config, model (safetensors only) and tokenizer, the MoE check, legacy config keys."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .adapters import MoEAdapter, get_adapter
from .errors import SecompressError, UnsupportedModelError

log = logging.getLogger(__name__)


def load_config(model: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's config; checks that it is a supported MoE before any weight is read."""
    from transformers import AutoConfig

    local = Path(model)
    if local.exists() and not (local / "config.json").is_file():
        raise SecompressError(f"'{model}' has no config.json: is it a transformers checkpoint folder?")
    if not local.exists() and (str(model).startswith((".", "/")) or str(model).count("/") != 1):
        raise SecompressError(f"model path '{model}' does not exist (and is not a hub id 'org/name')")
    try:
        config = AutoConfig.from_pretrained(str(model), revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SecompressError(f"could not read the config of '{model}': {e}") from e
    get_adapter(config)  # raises UnsupportedModelError naming the supported types
    return config


def _check_safetensors(model: str | Path) -> None:
    local = Path(model)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise SecompressError(f"'{model}' holds no .safetensors weights; secompress loads only safetensors "
                              "(pickle-based .bin files can run code when loaded)")


def load_model(model: str | Path, dtype: torch.dtype | str = torch.float32, revision: str | None = None,
               trust_remote_code: bool = False, device: str | None = None):
    """Load a supported MoE checkpoint (local folder or hub id) with eager attention.

    Eager attention returns attention probabilities, which the sink measurement needs.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model, revision, trust_remote_code)
    _check_safetensors(model)
    m = AutoModelForCausalLM.from_pretrained(
        str(model), config=config, dtype=dtype, revision=revision, use_safetensors=True,
        trust_remote_code=trust_remote_code, attn_implementation="eager",
        **({"device_map": device} if device else {}),
    )
    return m.eval()


def load_tokenizer(model: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), revision=revision, trust_remote_code=trust_remote_code)
    if len(tok) < 2:
        raise SecompressError(f"'{model}' has no usable tokenizer (transformers built a {len(tok)}-token "
                              "default): save a real tokenizer next to the weights")
    return tok


def check_model(model) -> MoEAdapter:
    """The adapter of an in-memory model; an error if it has no MoE layer."""
    adapter = get_adapter(model.config)
    if not adapter.moe_layer_indices(model):
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layer (a dense model?)")
    return adapter


def write_legacy_config_keys(config_path: Path, config, adapter: MoEAdapter) -> None:
    """Keep a saved config.json readable by transformers-4 stacks (vLLM, older serving code).

    transformers 5 renames keys when it saves (Qwen3-MoE ``num_experts`` -> ``num_local_experts``,
    ``rope_theta`` -> ``rope_parameters.rope_theta``); an old reader then silently uses its defaults.
    Each original spelling is written next to the new one, with the current value.
    """
    import json

    d = json.loads(config_path.read_text())
    for attr, key in adapter.legacy_config_keys:
        d[key] = getattr(config, attr)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in d:
        d["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(d, indent=2) + "\n")


def as_saved(model, state_dict: dict) -> dict:
    """``state_dict`` (all or part of ``model``'s, full names) as ``save_pretrained`` writes it: keys to
    ignore dropped, tied aliases dropped, transformers' weight conversions reverted (fused experts ->
    the per-expert keys of the original checkpoint format). Works on meta tensors."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = {k: v for k, v in state_dict.items() if k not in (getattr(model, "_keys_to_ignore_on_save", None) or ())}
    sd = remove_tied_weights_from_state_dict(sd, model)
    return revert_weight_conversion(model, sd)
