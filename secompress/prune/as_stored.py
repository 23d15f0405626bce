"""Write a pruned model in its source checkpoint's own storage format (block-scaled FP8 kept FP8).

Pruning changes no kept weight, so every tensor the source stores as FP8 (``weight`` codes +
``weight_scale_inv``, :mod:`secompress.fp8`) is copied byte for byte from the source, kept
experts renumbered (new id = position in ``kept``); removed experts are dropped; everything
else (routers sliced by pruning, norms, embeddings, lm_head) comes from the model, in the
dtype the source stores it. The config keeps the source's ``quantization_config``, so stock
``from_pretrained`` loads the result as it loads the source. Before any byte is copied, the
model's tensor is checked to equal the source's dequantized value: a model changed in memory
is never written as its stale source.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..adapters import MoEAdapter
from ..errors import SecompressError
from ..experts import expert_weights
from ..fp8 import SCALE_SUFFIX, dequantize
from ..layout import PROJ
from ..streaming import Checkpoint, disk_key

log = logging.getLogger(__name__)
MAX_SHARD_BYTES = 5 * 2**30


def _expert_key(adapter: MoEAdapter, key: str, kept: dict[int, list[int]]) -> tuple[int, int, str] | None:
    """(layer, expert id, rest) of a per-expert checkpoint key of a pruned layer, else None."""
    head = adapter.layers_path + "."
    if not key.startswith(head):
        return None
    idx, _, rest = key[len(head):].partition(".")
    pre = f"{adapter.ckpt_block}.{adapter.experts}."
    if not idx.isdigit() or int(idx) not in kept or not rest.startswith(pre):
        return None
    e, _, tail = rest[len(pre):].partition(".")
    return (int(idx), int(e), tail) if e.isdigit() else None


def _check_same(key: str, model_t: torch.Tensor, src: Checkpoint) -> None:
    want = dequantize(src.get_stored(key), src.get_stored(key + SCALE_SUFFIX), src.fp8.block, model_t.dtype)
    if not torch.equal(want, model_t.detach().cpu()):
        raise SecompressError(f"'{key}' in memory differs from the FP8 source '{src.path}': the model was changed "
                              "after loading, so its source bytes cannot be copied; save it unquantized")


@torch.no_grad()
def tensors_as_stored(model, adapter: MoEAdapter, src: Checkpoint, kept: dict[int, list[int]]):
    """Yield (checkpoint key, tensor) of the pruned ``model`` laid out and typed as ``src`` stores it."""
    live = {disk_key(adapter, n): t for n, t in model.state_dict().items()}  # [*] disk name -> tensor
    layers = adapter.layers(model)
    with src.reading():
        for key in src.where:
            if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in src.where:
                continue  # written with its weight
            ex = _expert_key(adapter, key, kept)
            if ex is not None:
                layer, e, tail = ex
                if e not in kept[layer]:
                    continue
                new_e = kept[layer].index(e)
                new_key = f"{adapter.layers_path}.{layer}.{adapter.ckpt_block}.{adapter.experts}.{new_e}.{tail}"
                if src.is_fp8(key):
                    proj = PROJ[adapter.ckpt_expert_names.index(tail.partition(".")[0])]
                    experts = adapter.experts_of(adapter.block_of(layers[layer]))
                    _check_same(key, expert_weights(experts, new_e)[proj], src)
                    yield new_key + SCALE_SUFFIX, src.get_stored(key + SCALE_SUFFIX)
                yield new_key, src.get_stored(key)
            elif src.is_fp8(key):
                if key in live:
                    _check_same(key, live[key], src)
                yield key, src.get_stored(key)
                yield key + SCALE_SUFFIX, src.get_stored(key + SCALE_SUFFIX)
            elif key in live:
                t = live[key].detach().cpu()
                yield key, t.to(src.stored_dtype(key)) if t.is_floating_point() else t
            else:  # stored but not a model tensor (e.g. an activation scale): as stored
                yield key, src.get_stored(key)


def save_as_stored(model, adapter: MoEAdapter, src: Checkpoint, kept: dict[int, list[int]], dst: Path,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the weights (sharded safetensors + index) and config.json of the pruned ``model`` into ``dst``."""
    from safetensors.torch import save_file

    shards, cur, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal cur, size
        if cur:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(cur, str(dst / name), metadata={"format": "pt"})
            shards.append((name, list(cur)))
            cur, size = {}, 0

    for key, t in tensors_as_stored(model, adapter, src, kept):
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            flush()
        cur[key] = t.contiguous()
        size += nbytes
    flush()
    n = len(shards)
    total = 0
    for i, (tmp, keys) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (dst / tmp).rename(dst / final)
        total += (dst / final).stat().st_size
        weight_map.update({k: final for k in keys})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.config.save_pretrained(dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k in ("quantization_config", "dtype", "torch_dtype"):
        if k in src.config:
            cfg[k] = src.config[k]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    log.info("wrote %d tensors in the source's storage format (%d shard(s))", len(weight_map), n)
