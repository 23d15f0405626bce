"""The ``plain`` export format: an unquantized model (pruned, merged or untouched) as transformers saves it.
Also a model whose weights a quantization backend changed in place without integer codes (a backend with
no format of its own): the tensors as they are, and its plan in ``quantization_plan.json``.

Each tensor under the name ``save_pretrained`` gives it (fused experts reverted to the checkpoint's
per-expert keys, tied aliases dropped), floating tensors in the export dtype. When the source
checkpoint is block-scaled FP8 (DeepSeek-V3/R1, Qwen3-FP8: ``weight`` in ``float8_e4m3fn`` +
``weight_scale_inv``, :mod:`secompress.fp8`) the result is written *as stored*: pruning changes no
kept weight, so every tensor the source stores as FP8 is copied byte for byte from the source, kept
experts renumbered (new id = position in ``kept``), removed experts dropped; everything else
(routers sliced by pruning, norms, embeddings, lm_head) comes from the model, in the dtype the
source stores it, and the config keeps the source's ``quantization_config``, so stock
``from_pretrained`` loads the result as it loads the source. Before any byte is copied the model's
tensor is checked to equal the source's dequantized value: a model changed in memory (merged
experts) is never written as its stale source. ``as_stored=False`` writes such a source's model in
the export dtype instead.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...checkpoints import as_saved, write_model_config
from ...errors import SecompressError
from ...experts import expert_weights
from ...fp8 import SCALE_SUFFIX, dequantize
from ...layout import PROJ
from ...streaming import Checkpoint, disk_key
from .base import HEADER_BYTES, ExportFormat, ExportSummary, LayerWriter, cast_floats, write_plan

FORMAT = "plain"


def fp8_checkpoint(path) -> Checkpoint | None:
    """The block-scaled FP8 checkpoint at ``path``, or None (no folder, or not FP8)."""
    if not path or not Path(path).is_dir() or not any(Path(path).glob("*.safetensors")):
        return None
    ckpt = Checkpoint(path)
    return ckpt if ckpt.fp8 is not None else None


def _expert_key(adapter, key: str, kept: dict[int, list[int]]) -> tuple[int, int, str] | None:
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
def tensors_as_stored(model, adapter, src: Checkpoint, kept: dict[int, list[int]], keys, live: dict):
    """Yield (checkpoint key, tensor) of the source ``keys`` of the pruned ``model`` laid out and typed as
    ``src`` stores them; ``live``: the model's tensors of that part, keyed as on disk."""
    layers = adapter.layers(model)
    with src.reading():
        for key in keys:
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


class PlainWriter(LayerWriter):
    """``kept`` (FP8 sources): MoE layer -> the source expert ids the model's experts are, in order
    (layers not named keep every expert); ``as_stored``: copy a block-scaled FP8 source's tensors."""

    format = FORMAT

    def __init__(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None,
                 kept: dict[int, list[int]] | None = None, as_stored: bool = True):
        super().__init__(folder, skeleton, plan, dtype, tokenizer, source, source_size)
        self.stored = fp8_checkpoint(self.source) if as_stored else None
        self.kept = {int(k): list(v) for k, v in (kept or {}).items()}
        self.groups: dict[int | None, list[str]] = {}  # decoder layer (None: outside the layers) -> source keys
        if self.stored is not None:
            head = self.adapter.layers_path + "."
            for key in self.stored.where:
                idx = key[len(head):].partition(".")[0] if key.startswith(head) else ""
                self.groups.setdefault(int(idx) if idx.isdigit() else None, []).append(key)

    def _as_stored(self, group: int | None, sd: dict) -> dict[str, torch.Tensor]:
        live = {disk_key(self.adapter, n): t for n, t in sd.items()}  # disk name -> tensor
        return dict(tensors_as_stored(self.model, self.adapter, self.stored, self.kept, self.groups.get(group, []),
                                      live))

    def rest_tensors(self, model):
        head = self.adapter.layers_path + "."
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        if self.stored is not None:
            return self._as_stored(None, sd)
        return cast_floats(as_saved(model, sd), self.dtype)

    def layer_tensors(self, index, layer):
        sd = layer.state_dict(prefix=self.layer_prefix(index))
        if self.stored is not None:
            return self._as_stored(index, sd)
        return cast_floats(as_saved(self.model, sd), self.dtype)

    def write_config(self, summary: ExportSummary) -> None:
        write_model_config(self.skeleton, self.folder, self.adapter, dtype=self.dtype)
        if self.stored is not None:  # the source's storage: its quantization_config and dtype
            cfg = json.loads((self.folder / "config.json").read_text())
            for k in ("quantization_config", "dtype", "torch_dtype"):
                if k in self.stored.config:
                    cfg[k] = self.stored.config[k]
            (self.folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if self.plan is not None:  # weights a backend changed in place (no codes): what it planned, for the record
            write_plan(self.folder, self.plan, {"format": FORMAT, "dtype": str(self.dtype).removeprefix("torch."),
                                                "size": summary.to_json()})


def plain_bytes(skeleton, dtype: torch.dtype) -> int:
    """Bytes of ``skeleton``'s tensors as saved (per-expert keys, tied aliases once), floats in ``dtype``,
    with their safetensors header entries."""
    from ...shards import specs_of

    sd = {k: torch.empty_like(v, device="meta") for k, v in skeleton.state_dict().items()}
    el = torch.empty((), dtype=dtype, device="meta").element_size()
    specs = specs_of(as_saved(skeleton, sd))
    return sum(math.prod(s.shape) * el if s.dtype.is_floating_point else s.nbytes for s in specs) + \
        len(specs) * HEADER_BYTES


class PlainFormat(ExportFormat):
    name = FORMAT
    holds = "unquantized"
    writer_class = PlainWriter
    load_snippet = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained('PATH')"

    def estimate_bytes(self, skeleton, plan, dtype, source=None) -> int:
        stored = fp8_checkpoint(source)
        if stored is None:
            return plain_bytes(skeleton, dtype)
        # as stored: the source's bytes, scaled by the share of its parameters the model keeps
        disk = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
        params = sum(math.prod(info["shape"]) for k, (_, _, info) in stored.where.items()
                     if not k.endswith(SCALE_SUFFIX))
        kept = sum(p.numel() for p in skeleton.parameters())
        return int(disk * min(1.0, kept / max(params, 1)))

    def compatibility(self, plan):
        return {"transformers": (True, "a plain checkpoint: stock from_pretrained loads it"),
                "vllm": (True, "a plain checkpoint")}


EXPORT = PlainFormat()
