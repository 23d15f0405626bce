"""Export and reload of bitsandbytes-quantized MoE models (``save_bnb`` / ``load_bnb``).

On disk the checkpoint uses the per-expert layout of transformers-4 checkpoints
(``model.layers.0.mlp.experts.5.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.5.w1``),
which is how transformers-4 and vLLM serialise bitsandbytes weights: each quantized
projection is stored as bitsandbytes writes it (4-bit: packed ``uint8`` ``weight`` plus
``weight.absmax``, ``weight.quant_map`` and ``weight.quant_state.bitsandbytes__nf4``; 8-bit:
``int8`` ``weight`` plus ``SCB``). Super Experts planned at 16 bit are plain tensors.

``config.json`` carries a bitsandbytes ``quantization_config`` when every quantized unit
has the same width (bitsandbytes configs have one width), with the 16-bit modules in
``llm_int8_skip_modules``, and the transformers-4 config keys. transformers 5 cannot load
it: its MoE classes have fused 3D experts that bitsandbytes does not quantize. Load it with
:func:`load_bnb` (``secompress.load`` calls it), which rebuilds the per-expert layout with
real ``Linear4bit`` / ``Linear8bitLt`` modules from the stored bytes, re-quantizing nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import SecompressError, require
from ..checkpoints import check_model, load_config, write_model_config
from ..outputs import atomic_dir
from ..layout import PROJ, PerExpertExperts, refuse_into
from ..streaming import Checkpoint, build_skeleton, disk_key, materialise_model
from .bnb import keep_canonical_layout, linear8bit_class
from .plan import PLAN_NAME, QuantPlan

log = logging.getLogger(__name__)
FORMAT = "secompress-bnb"
MAX_SHARD = "5GB"


def _targets(plan: QuantPlan, adapter) -> dict[str, int]:
    """Module name (per-expert layout) -> bits, for every quantized projection."""
    out = {}
    for name, b in plan.bits.items():
        u = plan.units[name]
        if b is None:
            continue
        if u.expert is None:
            out[name] = b
        else:
            base = f"{adapter.block_path(u.layer)}.{adapter.experts}.per_expert.{u.expert}"
            out.update({f"{base}.{p}": b for p in PROJ})
    return out


def _spec(model, plan: QuantPlan, adapter) -> dict:
    """What the loader needs besides the tensors; checks every planned unit is a bnb module."""
    bnb = require("bitsandbytes", "bnb", "saving a bitsandbytes model")
    kinds = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}
    quant_types = set()
    for name, b in _targets(plan, adapter).items():
        m = model.get_submodule(name)
        if not isinstance(m, kinds[b]):
            raise SecompressError(f"'{name}' is planned at {b} bits but is a {type(m).__name__}: save the model "
                                  "quantize_(..., QuantConfig(method='bnb')) returned this plan for")
        if b == 4:
            quant_types.add(m.weight.quant_type)
    if len(quant_types) > 1:
        raise SecompressError(f"mixed 4-bit types {sorted(quant_types)} in one model")
    dtype = model.get_input_embeddings().weight.dtype  # the model's 16-bit dtype: to_bnb computes in it
    return {"format": FORMAT, "quant_type": next(iter(quant_types), "nf4"), "compute_dtype": str(dtype)[6:],
            "bits": sorted(set(_targets(plan, adapter).values()))}


def _tensors(model, adapter) -> dict[str, torch.Tensor]:
    """Every tensor to store, keyed as on disk; fused 16-bit experts are split per expert."""
    return _collect(model.state_dict(), adapter, _fused16(model, adapter, adapter.moe_layer_indices(model)))


def layer_tensors(model, adapter, index: int) -> dict[str, torch.Tensor]:
    """The tensors of decoder layer ``index`` alone, as :func:`_tensors` stores them (the streamed export)."""
    layer = adapter.layers(model)[index]
    moe = [index] if adapter.block_of(layer) is not None else []
    return _collect(layer.state_dict(prefix=f"{adapter.layers_path}.{index}."), adapter, _fused16(model, adapter, moe))


def rest_tensors(model, adapter) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, output head), as :func:`_tensors`."""
    head = adapter.layers_path + "."
    return _collect({k: v for k, v in model.state_dict().items() if not k.startswith(head)}, adapter, {})


def _fused16(model, adapter, indices) -> dict[str, nn.Module]:
    """State-dict prefix -> fused experts module of the MoE layers ``indices`` whose experts stayed fused."""
    fused = {}
    for i in indices:
        ex = adapter.experts_of(adapter.block_of(adapter.layers(model)[i]))
        if not isinstance(ex, PerExpertExperts):
            fused[f"{adapter.block_path(i)}.{adapter.experts}."] = ex
    return fused


def _collect(state: dict, adapter, fused: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        if any(k.startswith(p) for p in fused):
            continue
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            if v.is_floating_point() and v.numel() and (v.data_ptr(), v.shape) in seen:
                continue  # tied to a tensor already stored (tie_weights restores it on load)
            seen.add((v.data_ptr(), v.shape))
            out[disk_key(adapter, k)] = v.detach().to("cpu").contiguous()
    for prefix, ex in fused.items():
        for k, v in PerExpertExperts(ex).state_dict(prefix=prefix).items():
            out[disk_key(adapter, k)] = v.contiguous()
    return out


def _skip_modules(model, plan: QuantPlan, adapter) -> list[str]:
    """Disk names of every nn.Linear left 16-bit (transformers-4 / vLLM must not expect quant states)."""
    quantized = set(_targets(plan, adapter))
    names = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name not in quantized:
            names.append(disk_key(adapter, name))
    for i in adapter.moe_layer_indices(model):
        # routers: nn.Linear in transformers 4, which would otherwise expect quantized weights
        for attr in (adapter.router, adapter.shared_expert_gate):
            if attr is not None:
                names.append(disk_key(adapter, f"{adapter.block_path(i)}.{attr}"))
        ex = adapter.experts_of(adapter.block_of(adapter.layers(model)[i]))  # fused 16-bit: every projection
        if not isinstance(ex, PerExpertExperts):
            base = f"{adapter.block_path(i)}.{adapter.experts}.per_expert"
            names += [disk_key(adapter, f"{base}.{e}.{p}") for e in range(ex.num_experts) for p in PROJ]
    return list(dict.fromkeys(names))


def quantization_config(model, plan: QuantPlan, adapter, spec: dict) -> dict | None:
    """A transformers-4 / vLLM bitsandbytes config, or None when the plan mixes 4 and 8 bits."""
    if len(spec["bits"]) != 1:
        return None
    four = spec["bits"] == [4]
    return {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
            "bnb_4bit_quant_type": spec["quant_type"], "bnb_4bit_compute_dtype": spec["compute_dtype"],
            "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": _skip_modules(model, plan, adapter)}


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(model, adapter, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``tensors`` as (sharded) safetensors plus the model's config.json (with the transformers-4
    keys) and generation_config.json into ``folder``: the part every per-expert export shares."""
    _write_shards(tensors, folder)
    write_model_config(model, folder, adapter)


@torch.no_grad()
def save_bnb(model, tokenizer, plan: QuantPlan, out: str | Path, overwrite: bool = False) -> Path:
    """Write a bitsandbytes-quantized model atomically to ``out`` (see the module docstring)."""
    adapter = check_model(model)
    spec = _spec(model, plan, adapter)  # fails before anything is written
    qcfg = quantization_config(model, plan, adapter, spec)
    tensors = _tensors(model, adapter)
    with atomic_dir(out, overwrite) as tmp:
        _write_shards(tensors, tmp)
        write_side_files(tmp, model, adapter, plan, spec, qcfg, tokenizer)
    log.info("wrote %s (%s, bits %s)", out, FORMAT, spec["bits"])
    return Path(out)


def write_side_files(folder: Path, model, adapter, plan: QuantPlan, spec: dict, qcfg: dict | None,
                     tokenizer=None) -> None:
    """config.json (transformers-4 keys, the bitsandbytes quantization_config when there is one),
    generation_config.json, the tokenizer and the plan with its export spec."""
    write_model_config(model, folder, adapter)
    cfg = json.loads((folder / "config.json").read_text())
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    cfg.setdefault("torch_dtype", spec["compute_dtype"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    d = plan.to_json()
    d["export"] = spec
    (folder / PLAN_NAME).write_text(json.dumps(d, indent=2) + "\n")


# ---- load ----------------------------------------------------------------------------------
def _bnb_module(lin: nn.Linear, key: str, ckpt: Checkpoint, bits: int, spec: dict) -> nn.Module:
    """A Linear4bit / Linear8bitLt holding the stored bytes of ``key`` (no re-quantization)."""
    bnb = require("bitsandbytes", "bnb", "loading a bitsandbytes checkpoint")
    bias = lin.bias is not None
    if f"{key}.weight" not in ckpt:
        raise SecompressError(f"'{ckpt.path}' has no tensor '{key}.weight'")
    w = ckpt.get(f"{key}.weight")
    if bits == 4:
        stats = {k[len(key) + len(".weight."):]: ckpt.get(k) for k in ckpt.where if k.startswith(f"{key}.weight.")}
        if not stats or w.dtype != torch.uint8:
            raise SecompressError(f"'{key}' is planned at 4 bits but stored as {w.dtype} without a quant state")
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=getattr(
            torch, spec["compute_dtype"]), quant_type=spec["quant_type"], device="meta")
        q.weight = bnb.nn.Params4bit.from_prequantized(w, stats, requires_grad=False, device="cpu", module=q)
    else:
        if w.dtype != torch.int8 or f"{key}.SCB" not in ckpt:
            raise SecompressError(f"'{key}' is planned at 8 bits but stored as {w.dtype} without SCB")
        q = linear8bit_class()(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False, CB=w, SCB=ckpt.get(f"{key}.SCB"))
    if bias:
        q.bias = nn.Parameter(ckpt.get(f"{key}.bias"), requires_grad=False)
    keep_canonical_layout(q)
    return q


@torch.no_grad()
def load_bnb(path: str | Path, device: str | None = None):
    """Load a :func:`save_bnb` checkpoint with its real bitsandbytes modules; returns (model, plan)."""
    path = Path(path)
    d = json.loads((path / PLAN_NAME).read_text())
    spec = d.get("export", {})
    if spec.get("format") != FORMAT:
        raise SecompressError(f"'{path}' is not a {FORMAT} checkpoint (export format {spec.get('format')!r})")
    plan = QuantPlan.from_json(d)
    model = build_skeleton(load_config(path))  # parameters on meta, buffers real
    adapter = check_model(model)
    keep_fused = {}
    for i in adapter.moe_layer_indices(model):
        block = adapter.block_of(adapter.layers(model)[i])
        fused = adapter.experts_of(block)
        if not any(plan.bits[n] is not None for n in plan.moe_layers().get(i, [])):
            keep_fused[i] = fused
        setattr(block, adapter.experts, PerExpertExperts(fused))
    ckpt = Checkpoint(path, raw=True)  # reads its own codes
    with ckpt.reading():
        for name, bits in _targets(plan, adapter).items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    _bnb_module(model.get_submodule(name), disk_key(adapter, name), ckpt, bits, spec))
    materialise_model(model, ckpt, adapter, getattr(torch, spec["compute_dtype"]))  # the rest, as stored
    for i, fused in keep_fused.items():  # 16-bit layers run fused, as in the model that was saved
        block = adapter.block_of(adapter.layers(model)[i])
        per = adapter.experts_of(block)
        dtype = per.per_expert[0].down_proj.weight.dtype
        for name, p in list(fused.named_parameters(recurse=False)):
            setattr(fused, name, nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))
        refuse_into(per, fused)
        setattr(block, adapter.experts, fused)
    model.config.dtype = getattr(torch, spec["compute_dtype"])
    if device is not None:
        model.to(device)
    return model.eval(), plan
