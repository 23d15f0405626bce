"""Loading checkpoints: config, model (safetensors only) and tokenizer, the MoE check, legacy config keys."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .adapters import MoEAdapter, get_adapter
from .errors import CheckpointError, SecompressError, UnsupportedModelError

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


def check_finite_weights(model, source: str | Path = "the model") -> None:
    """Every floating-point parameter is finite, or an error naming the first bad one (and its layer)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            bad = ~torch.isfinite(p)
            where = ""
            if p.dim() == 3:  # fused experts [E, ...]: name them
                where = f" (experts {bad.flatten(1).any(1).nonzero().flatten().tolist()})"
            raise CheckpointError(f"'{source}': weight '{name}'{where} has {int(bad.sum())} NaN/inf values; the "
                                  "checkpoint is corrupt or was saved after a diverged training step")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # "auto": the checkpoint's own dtype (config.dtype)


def resolve_dtype(dtype: torch.dtype | str, config) -> torch.dtype:
    """A torch dtype from a name in :data:`DTYPE_CHOICES` or a dtype; "auto" is the checkpoint's own
    (``config.dtype``, formerly ``torch_dtype``; float32 when unset; bfloat16 for an FP8 one)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise SecompressError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got '{dtype}'")
        return DTYPES[dtype]
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own.removeprefix("torch."), None)
    if own in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.bfloat16
    return own if own in DTYPES.values() else torch.float32


def local_checkpoint(model: str | Path, revision: str | None = None) -> Path:
    """A local folder of safetensors shards: the path itself, or the hub snapshot's safetensors + JSON files."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline, gated, missing: one clear message
        raise SecompressError(f"the safetensors shards of '{model}' are needed on disk and they could not be "
                              f"downloaded ({type(e).__name__}); download them and pass the folder") from e


DEQUANTIZED_ON_LOAD = {"mxfp4": "Mxfp4Config"}  # quant_method -> transformers config class with dequantize=True


def load_model(model: str | Path, dtype: torch.dtype | str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, device: str | None = None):
    """Load a supported MoE checkpoint (local folder or hub id) with eager attention.

    Eager attention returns attention probabilities, which the sink measurement needs.
    ``dtype`` "auto" keeps the checkpoint's own dtype. A block-scaled FP8 checkpoint
    (DeepSeek-V3/R1, Qwen3-FP8) is dequantized tensor by tensor on the CPU by
    :class:`~secompress.streaming.Checkpoint` (transformers' CPU fallback derives the block
    from the scale grid and is wrong for partial blocks) and then moved to ``device``; so is a
    compressed-tensors checkpoint, whoever wrote it (llm-compressor RTN/GPTQ, act-order g_idx,
    any ``ignore`` list; :mod:`secompress.ct_read`), through compressed-tensors' own
    decompressors (not transformers' loader, which re-initialises ignored expert layers in
    some releases). Either way the config loses ``quantization_config`` (the weights in memory
    are real). MXFP4 (GPT-OSS) is dequantized by transformers on load (asked explicitly, so a
    GPU does not keep MXFP4 kernels). Any other quantization_config is refused.
    """
    from transformers import AutoModelForCausalLM

    from .ct_read import is_ct
    from .fp8 import BlockFP8
    from .integrity import check_loading_info, no_unpickling, verify

    config = load_config(model, revision, trust_remote_code)
    _check_safetensors(model)
    torch_dtype = resolve_dtype(dtype, config)
    qc = getattr(config, "quantization_config", None)
    extra = {"device_map": device} if device else {}
    method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method") if qc is not None else None
    if method in DEQUANTIZED_ON_LOAD:
        import transformers

        extra["quantization_config"] = getattr(transformers, DEQUANTIZED_ON_LOAD[method])(dequantize=True)
    elif is_ct(qc) or BlockFP8.from_config(qc) is not None:  # from_config raises for what we cannot read
        return _load_dequantized(model, config, torch_dtype, revision, device)  # Checkpoint verifies
    # only .safetensors files, every tensor present with its shape, before any weight is read (a hub id: its snapshot)
    verify(local_checkpoint(model, revision), config)
    try:
        with no_unpickling(f"a weights file of '{model}'"):  # whatever transformers picks, no pickle runs
            m, info = AutoModelForCausalLM.from_pretrained(
                str(model), config=config, dtype=torch_dtype, revision=revision, use_safetensors=True,
                output_loading_info=True,
                trust_remote_code=trust_remote_code, attn_implementation="eager", **extra,
            )
    except Exception as e:  # safetensors' own errors: corrupt files the header check let through
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"could not load the weights of '{model}': {str(e).splitlines()[0]}") from None
    check_loading_info(info, model)  # nothing left at its random initialisation
    return m.eval()


def _load_dequantized(model: str | Path, config, dtype: torch.dtype, revision: str | None, device: str | None):
    """A block-FP8 or compressed-tensors checkpoint, every weight dequantized on read by :class:`Checkpoint`."""
    from .streaming import Checkpoint, build_skeleton, materialise_model

    ckpt = Checkpoint(local_checkpoint(model, revision))  # refuses what it cannot read, before any weight
    m = build_skeleton(config)
    materialise_model(m, ckpt, get_adapter(config), dtype)
    if getattr(m.config, "quantization_config", None) is not None:
        del m.config.quantization_config  # the weights in memory are real
    m.config.dtype = dtype
    m.name_or_path = str(model)
    what = f"compressed-tensors ({ckpt.ct.describe()})" if ckpt.ct is not None else "FP8"
    log.info("dequantized the %s checkpoint '%s' to %s", what, model, dtype)
    return (m.to(device) if device else m).eval()


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


def write_model_config(model, folder: Path, adapter: MoEAdapter | None = None, dtype: torch.dtype | None = None) -> None:
    """config.json with the transformers-4 keys (:func:`write_legacy_config_keys`), and
    generation_config.json when the model has one: the config part of every export. ``dtype``: the
    dtype the weights are written in (config.json's ``dtype``); ``architectures`` names the model's
    class, as ``save_pretrained`` writes it (vLLM needs it). The model's own config is not changed."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_legacy_config_keys(Path(folder) / "config.json", config, adapter or check_model(model))


def as_saved(model, state_dict: dict) -> dict:
    """``state_dict`` (all or part of ``model``'s, full names) as ``save_pretrained`` writes it: keys to
    ignore dropped, tied aliases dropped, transformers' weight conversions reverted (fused experts ->
    the per-expert keys of the original checkpoint format). Works on meta tensors."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = {k: v for k, v in state_dict.items() if k not in (getattr(model, "_keys_to_ignore_on_save", None) or ())}
    sd = remove_tied_weights_from_state_dict(sd, model)
    return revert_weight_conversion(model, sd)
