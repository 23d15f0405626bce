"""Checkpoint integrity, checked once per load before any weight is read or any compute runs.

Every loader goes through :func:`verify`: in memory (:func:`secompress.checkpoints.load_model`)
and streamed (:class:`secompress.streaming.Checkpoint`, which the layer engine, the FP8 loader and
the export readers open). Three rules, each failure one :class:`~secompress.errors.CheckpointError`
line naming the file or tensor:

1. **Files.** A checkpoint is ``model.safetensors.index.json`` and the shards it names, or one
   ``model.safetensors`` (both at once is ambiguous and refused, unless the index names just that
   file). Every name in the index is a bare ``*.safetensors`` file name inside the folder (a
   symlink, as in the Hub cache, is followed; its content must still parse as safetensors): a
   ``.bin`` shard (a pickle, which can run code), ``/etc/passwd`` or ``../elsewhere.safetensors``
   is refused. Other ``*.safetensors`` files in the folder (a codes file, a consolidated copy) are
   not part of the checkpoint.
2. **Headers** (no tensor data read). Each header parses, every tensor lies inside its file, its
   bytes match its shape and safetensors dtype, and no tensor is stored twice.
3. **Tensors.** The expected set comes from the model's meta skeleton (built from ``config.json``)
   and the adapter's naming (:meth:`MoEAdapter.disk_key`, the mapping the streamed reader uses):
   every parameter is present exactly once with its shape and a floating-point dtype, under its own
   name or its checkpoint name; a fused experts tensor may instead be stored per expert (the
   transformers-4 / original layout, e.g. Mixtral's ``block_sparse_moe.experts.3.w1.weight``) or, in
   an MXFP4 checkpoint, as ``*_blocks`` + ``*_scales``; a block-scaled FP8 weight comes with its
   ``weight_scale_inv`` of the right grid; a tied output head may be absent; persistent buffers may
   be stored (those the adapter names as router tensors must be). Nothing else may be stored except
   what the adapter tolerates as data (DeepSeek-V3's multi-token-prediction layers after
   ``num_hidden_layers``).

A compressed-tensors checkpoint (llm-compressor's, or ours read as input; :mod:`secompress.ct_read`)
is checked as the model sees it: each quantized weight as compressed-tensors rebuilds it from its
stored parameters (``weight_packed``, ``weight_scale``...: present, their shapes giving the weight's),
those parameters not listed themselves; activation and KV-cache scales (``input_scale``, ``k_scale``...,
which secompress does not apply) are tolerated on the modules that have them.

Our own quantized exports (read with ``Checkpoint(path, raw=True)``) hold codes instead of weights
(``weight_packed``, bitsandbytes' ``weight.absmax``...), which their format readers check; for them
rule 3 is checked per module: every stored tensor belongs to a module of the model, and every
module with parameters has stored tensors.

:func:`no_unpickling` makes ``torch.load`` raise inside a block: the in-memory loader calls
transformers' ``from_pretrained`` inside it, so no unpickler runs on model input whatever the files say.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import MoEAdapter, get_adapter
from .errors import CheckpointError
from .experts import layout_of
from .fp8 import SCALE_SUFFIX, BlockFP8, grid

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype codes -> torch dtypes (the ones secompress reads)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
FP8_CODES = ("F8_E4M3", "F8_E5M2")
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")

Where = dict[str, tuple[Path, int, dict]]  # tensor name -> (file, offset of its data section, header entry)


# ---- 1. files -----------------------------------------------------------------------------------
def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files a local checkpoint is made of: the shards its index names, or ``model.safetensors``."""
    folder = Path(folder)
    index, single = folder / INDEX_NAME, folder / SINGLE_NAME
    explicit = _config_dict(folder).get("transformers_weights")
    if explicit is not None and explicit not in (INDEX_NAME, SINGLE_NAME):
        raise CheckpointError(f"'{folder / 'config.json'}' names transformers_weights '{explicit}'; secompress reads "
                              f"only {SINGLE_NAME} or {INDEX_NAME}")
    if index.is_file() and single.exists() and set(_weight_map(index).values()) != {SINGLE_NAME}:
        raise CheckpointError(f"'{folder}' holds both {SINGLE_NAME} and an {INDEX_NAME} naming other shards: which "
                              "one is the checkpoint is ambiguous (transformers would read only the first); remove "
                              "the one that is not")
    if not index.is_file():
        if not single.is_file():
            others = sorted(p.name for p in folder.glob("*.safetensors"))
            raise CheckpointError(f"'{folder}' has no {SINGLE_NAME} or {INDEX_NAME}" +
                                  (f" (only {', '.join(others[:3])})" if others else
                                   "; secompress loads only safetensors (pickle-based .bin files can run code)"))
        return [single]
    names = sorted(set(_weight_map(index).values()))
    for name in names:
        if not _is_shard_name(name):
            raise CheckpointError(f"'{index}' names '{name}' as a shard: every shard must be a .safetensors file "
                                  "inside the checkpoint folder (secompress never unpickles .bin files: they can run "
                                  "code when loaded)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"'{folder / missing[0]}' is missing: '{INDEX_NAME}' lists it "
                              f"({len(missing)} of {len(names)} shards missing)")
    return [folder / n for n in names]


def _is_shard_name(name) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and name not in (".safetensors",)
            and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(k, str) for k in wm):
            raise TypeError("weight_map is not a mapping of tensor names")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{index}' is not a valid safetensors index ({type(e).__name__}: {e})") from None
    return wm


def _config_dict(folder: Path) -> dict:
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


# ---- 2. headers ---------------------------------------------------------------------------------
def read_header(f: Path) -> tuple[int, dict]:
    """(offset of the data section, header without ``__metadata__``) of one safetensors file, checked:
    truncated files, headers that are not safetensors JSON, unknown dtypes, tensors whose byte range
    does not match their shape or reaches past the end of the file are one error naming the file."""
    size = f.stat().st_size
    with open(f, "rb") as h:
        head = h.read(8)
        if len(head) < 8:
            raise CheckpointError(f"'{f}' is truncated: {size} bytes, shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"'{f}' is truncated or corrupt: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(h.read(n))
            header.pop("__metadata__", None)
            entries = [(k, v["dtype"], [int(d) for d in v["shape"]], [int(o) for o in v["data_offsets"]])
                       for k, v in header.items()]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(f"'{f}' has a corrupt safetensors header (not the JSON safetensors writes)") from None
    for key, dtype, shape, offsets in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"'{key}' in '{f}' has dtype {dtype}, which secompress does not read "
                                  f"({', '.join(SAFETENSORS_DTYPES)})")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if len(offsets) != 2 or min(shape, default=0) < 0 or offsets[1] - offsets[0] != nbytes or offsets[0] < 0:
            raise CheckpointError(f"'{f}' has a corrupt safetensors header: '{key}' ({dtype} {shape}) needs "
                                  f"{nbytes} bytes, its offsets {offsets} say otherwise")
        if 8 + n + offsets[1] > size:
            raise CheckpointError(f"'{f}' is truncated: its tensors need {8 + n + offsets[1]} bytes, the file has {size}")
    return 8 + n, header


def read_headers(folder: str | Path) -> Where:
    """Every tensor of the checkpoint in ``folder`` (its :func:`checkpoint_files`), each stored once."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    where: Where = {}
    for f in files:
        base, header = read_header(f)
        for k, v in header.items():
            if k in where:
                raise CheckpointError(f"tensor '{k}' is stored twice: in '{where[k][0].name}' and '{f.name}' of "
                                      f"'{folder}'")
            where[k] = (f, base, v)
    index = folder / INDEX_NAME
    if index.is_file():
        for k, name in _weight_map(index).items():
            if k in where and where[k][0].name != name:
                raise CheckpointError(f"'{index}' puts '{k}' in '{name}'; it is in '{where[k][0].name}'")
    return where


# ---- 3. tensors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Need:
    """One tensor the model needs, and the ways a checkpoint may store it (each a tuple of
    ``(checkpoint key, shape, kind)`` that must all be present; kind: "float", "u8" or "any")."""

    name: str
    forms: tuple[tuple[tuple[str, tuple[int, ...], str], ...], ...]
    required: bool = True


def mxfp4_form(key: str, shape: tuple[int, ...], transposed: bool) -> tuple:
    """MXFP4 (GPT-OSS): a fused [E, In, Out] (transposed) weight stored as ``<key>_blocks`` [E, Out, In/32, 16]
    (two 4-bit codes per byte) and ``<key>_scales`` [E, Out, In/32] (one E8M0 exponent per 32 values), uint8."""
    e, a, b = shape
    out, inp = (b, a) if transposed else (a, b)
    g = -(-inp // 32)
    return ((f"{key}_blocks", (e, out, g, 16), "u8"), (f"{key}_scales", (e, out, g), "u8"))


# quant_method -> extra stored form of a fused experts weight (the checkpoint's own codes, dequantized on load)
STORED_FORMS = {"mxfp4": mxfp4_form}


def meta_skeleton(config) -> torch.nn.Module:
    """The model with every parameter and buffer on ``meta`` (names and shapes only)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _per_expert_form(adapter: MoEAdapter, base: str, pname: str, shape: tuple[int, ...], transposed: bool) -> tuple:
    """Keys of a fused experts tensor stored per expert, as the streamed reader fuses them."""
    gate_n, up_n, down_n = adapter.ckpt_expert_names
    bias = pname.endswith("_bias")
    suffix = "bias" if bias else "weight"
    parts = (gate_n, up_n) if pname.startswith("gate_up_proj") else (down_n,)
    one = shape[1:]  # one expert's slice: [2I, H] / [H, I] (transposed: last two swapped), or a bias [2I] / [H]
    if transposed and not bias:
        one = one[::-1]
    one = (one[0] // len(parts), *one[1:])  # gate and up each hold half the rows
    return tuple((f"{base}.{e}.{p}.{suffix}", one, "float") for e in range(shape[0]) for p in parts)


def expected(config, skeleton=None) -> tuple[list[Need], MoEAdapter]:
    """What a checkpoint of ``config`` must store (see the module docstring)."""
    adapter = get_adapter(config)
    model = skeleton if skeleton is not None else meta_skeleton(config)
    qc = getattr(config, "quantization_config", None)
    method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method") if qc is not None else None
    extra_form = STORED_FORMS.get(method)
    routers = {id(adapter.router_of(adapter.block_of(layer))) for layer in adapter.layers(model)
               if adapter.block_of(layer) is not None}
    needs, seen = [], set()
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        fused = hasattr(mod, "num_experts")
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            name, shape = pre + pname, tuple(p.shape)
            kind = "float" if p.is_floating_point() else "any"
            forms = [((k, shape, kind),) for k in dict.fromkeys((adapter.disk_key(name), name))]
            if fused and pname in FUSED_EXPERT_PARAMS:  # fused under the model's own name, or per expert
                transposed = layout_of(mod).transposed
                per = _per_expert_form(adapter, adapter.disk_key(mname), pname, shape, transposed)
                whole = ((name, shape, kind),)
                forms = [whole, per] if adapter.ckpt_fused_experts else [per, whole]  # the usual one first
                if extra_form is not None and not pname.endswith("_bias"):
                    forms.append(extra_form(name, shape, transposed))
            needs.append(Need(name, tuple(forms), required=id(p) not in seen))  # a tied alias may be absent
            seen.add(id(p))
        for bname, b in mod._buffers.items():
            if b is None:
                continue
            name = pre + bname
            persistent = bname not in mod._non_persistent_buffers_set
            kind = "float" if b.is_floating_point() else "any"
            forms = tuple(((k, tuple(b.shape), kind),) for k in dict.fromkeys((adapter.disk_key(name), name)))
            needs.append(Need(name, forms, required=persistent and id(mod) in routers
                              and bname in adapter.router_per_expert))
    return needs, adapter


def _tolerated(adapter: MoEAdapter, config, key: str) -> bool:
    """Stored tensors the adapter declares as not part of the model (data, not names)."""
    if adapter.extra_layers_key is None:
        return False
    head = adapter.layers_path + "."
    if not key.startswith(head):
        return False
    idx = key[len(head):].split(".", 1)[0]
    n, extra = config.num_hidden_layers, int(getattr(config, adapter.extra_layers_key, 0) or 0)
    return idx.isdigit() and n <= int(idx) < n + extra


def _kind_ok(code: str, kind: str) -> bool:
    if kind == "any":
        return True
    return code == "U8" if kind == "u8" else code in FLOAT_CODES or code in FP8_CODES


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# compressed-tensors parameters of activation / KV-cache quantization: data secompress does not apply
CT_ACTIVATION_PARAMS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale",
                        "output_zero_point", "k_scale", "v_scale", "k_zero_point", "v_zero_point")


def ct_view(where: Where, qc, folder: Path) -> Where:
    """The tensors of a compressed-tensors checkpoint as the model sees them (see the module docstring):
    each rebuilt weight with its shape and its scale's dtype (``"cols"``: its in-features are known up to
    channel-wise packing, a multiple of that), its parameters and activation scales not listed."""
    from .ct_read import CTReader

    reader = CTReader(qc, {k: v for k, (_, _, v) in where.items()}, f"'{folder}'")  # its own errors: one line
    modules = {e.module for e in reader.weights.values()}
    owners = modules | {m.rpartition(".")[0] for m in modules}  # k_scale / v_scale sit on the attention module
    view = {k: v for k, v in where.items() if k not in reader.consumed and not (
        k.rpartition(".")[2] in CT_ACTIVATION_PARAMS and k.rpartition(".")[0] in owners)}
    for key, e in reader.weights.items():
        for k in reader.needed(key):
            if k not in where:
                raise CheckpointError(f"checkpoint '{folder}': tensor '{k}' is missing (compressed-tensors format "
                                      f"'{e.fmt}' rebuilds '{key}' from it); nothing was computed")
        info = dict(reader.info(key))
        args = reader.config.config_groups[e.group].weights
        if e.packed and args.strategy != "group":  # In = packed columns * 32 / bits: rounded up to that multiple
            info["cols"] = 32 // args.num_bits
        view[key] = (where[f"{e.module}.weight_scale"][0], 0, info)
    return view


def _shape_ok(stored: tuple, shape: tuple, entry: dict) -> bool:
    m = entry.get("cols")
    return stored == shape or (m is not None and len(stored) == len(shape) and stored[:-1] == shape[:-1]
                               and stored[-1] == -(-shape[-1] // m) * m)


def check_tensors(where: Where, config, folder: Path, skeleton=None, expect=None) -> None:
    """Rule 3 on an unquantized (or block-FP8, or MXFP4, or compressed-tensors: :func:`ct_view`)
    checkpoint: raises on the first problem (``expect``: :func:`expected`'s result, when the caller has it)."""
    from .ct_read import is_ct

    qc = getattr(config, "quantization_config", None)
    method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method") if qc is not None else None
    if is_ct(qc):
        where = ct_view(where, qc, folder)
    fp8 = None if method in STORED_FORMS or is_ct(qc) else BlockFP8.from_config(qc)  # raises for unreadable ones
    needs, adapter = expect if expect is not None else expected(config, skeleton)
    missing, wrong, used = [], [], set()
    for need in needs:
        full = [f for f in need.forms if all(k in where for k, _, _ in f)]
        if not full:
            best = max(need.forms, key=lambda f: sum(k in where for k, _, _ in f))
            absent = [k for k, _, _ in best if k not in where]
            used.update(k for k, _, _ in best if k in where)
            if need.required and len(absent) < len(best):
                missing.append(f"tensor '{absent[0]}' is missing" + (f" ({len(absent)} of the {len(best)} tensors "
                                                                        f"of '{need.name}')" if len(best) > 1 else ""))
            elif need.required:
                key = best[0][0]
                missing.append(f"tensor '{key}' {_fmt(best[0][1])} is missing" +
                               (f" (the model's '{need.name}')" if key != need.name else ""))
            continue
        for key, shape, kind in full[0]:
            used.add(key)
            code, stored = where[key][2]["dtype"], tuple(where[key][2]["shape"])
            if not _shape_ok(stored, shape, where[key][2]):
                wrong.append(f"tensor '{key}' has shape {_fmt(stored)}; the model needs {_fmt(shape)}")
            elif not _kind_ok(code, kind):
                wrong.append(f"tensor '{key}' is stored as {code}; the model needs "
                             + ("uint8 codes" if kind == "u8" else "floating-point weights"))
            elif code in FP8_CODES:
                scale = key + SCALE_SUFFIX
                if fp8 is None or scale not in where:
                    wrong.append(f"'{key}' in '{folder}' is stored in FP8 without a '{scale}' block scale (or the "
                                 "config has no fp8 quantization_config): refusing to read FP8 codes as weights")
                elif len(shape) != 2 or tuple(where[scale][2]["shape"]) != grid(shape, fp8.block):
                    want = _fmt(grid(shape, fp8.block)) if len(shape) == 2 else "a 2D weight"
                    wrong.append(f"'{scale}' has shape {_fmt(where[scale][2]['shape'])}; the FP8 weight {_fmt(shape)} "
                                 f"with block {list(fp8.block)} needs {want}")
                used.add(scale)
    extra = [k for k in where if k not in used and not _tolerated(adapter, config, k)]
    problems = missing + wrong + [
        f"tensor '{k}' (in '{where[k][0].name}') is not part of this {config.model_type} model; config.json and the "
        "weights do not match" for k in extra]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint '{folder}': {problems[0]}{more}; nothing was computed")


def check_modules(where: Where, config, folder: Path, skeleton=None) -> None:
    """Rule 3 per module, for our own quantized exports (codes instead of weights): every stored tensor
    belongs to a module of the model, every module with parameters has stored tensors."""
    adapter = get_adapter(config)
    model = skeleton if skeleton is not None else meta_skeleton(config)
    owners: dict[str, list[str]] = {}  # checkpoint module name -> the tensors it owns
    wanted: list[tuple[str, list[list[str]]]] = []  # (module, alternatives: each a list of module names)
    fused, seen = set(), set()
    for mname, mod in model.named_modules():
        params = [p for p in mod._parameters.values() if p is not None]
        if not params:
            continue
        disk = adapter.disk_key(mname)
        owners.setdefault(disk, [])
        alts = [[disk]]
        if hasattr(mod, "num_experts"):
            gate_n, up_n, down_n = adapter.ckpt_expert_names
            per = [f"{disk}.{e}.{p}" for e in range(int(mod.num_experts)) for p in (gate_n, up_n, down_n)]
            owners.update({m: [] for m in per})
            alts.append(per)
            fused.add(disk)
        if all(id(p) in seen for p in params):
            alts = []  # tied alias (lm_head): may be absent
        seen.update(id(p) for p in params)
        if alts:
            wanted.append((mname, alts))
    for key in where:
        parts = key.split(".")
        i = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in owners), None)
        owner = None if i is None or (".".join(parts[:i]) in fused and parts[i].isdigit()) else ".".join(parts[:i])
        if owner is not None:  # (an expert index past the count is not the fused module's own tensor)
            owners[owner].append(key)
        elif not _tolerated(adapter, config, key):
            raise CheckpointError(f"checkpoint '{folder}': tensor '{key}' (in '{where[key][0].name}') belongs to no "
                                  f"module of this {config.model_type} model; nothing was computed")
    for mname, alts in wanted:
        if not any(all(owners[m] for m in alt) for alt in alts):
            absent = next(m for m in alts[-1] if not owners[m])
            raise CheckpointError(f"checkpoint '{folder}' has no tensor for module '{absent}' (the model's "
                                  f"'{mname}'); nothing was computed")


# ---- the one entry --------------------------------------------------------------------------------
_VERIFIED: dict[tuple, Where] = {}


def _signature(folder: Path) -> tuple:
    """Names, sizes and modification times of the folder's safetensors and JSON files."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def verify(folder: str | Path, config=None, raw: bool = False, skeleton=None) -> Where:
    """Rules 1-3 on the local checkpoint ``folder``; its tensors (name -> file, data offset, header entry).

    ``config`` defaults to the folder's config.json; ``raw`` for our own quantized exports (rule 3 per
    module). A checkpoint verified once in this process (same files, sizes and times) is not read again.
    """
    folder = Path(folder)
    key = (str(folder.resolve()), raw, _signature(folder))
    if key in _VERIFIED:
        return dict(_VERIFIED[key])
    where = read_headers(folder)
    if config is None:
        config = _load_config(folder)
    (check_modules if raw else check_tensors)(where, config, folder, skeleton)
    _VERIFIED[key] = where
    log.info("checkpoint '%s': %d tensors in %d files verified", folder, len(where), len({f for f, _, _ in where.values()}))
    return dict(where)


def _load_config(folder: Path):
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"'{folder}' has no config.json: the tensors a checkpoint must hold follow from it")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read the config of '{folder}': {str(e).splitlines()[0]}") from None


# ---- no unpickler on model input ------------------------------------------------------------------
@contextmanager
def no_unpickling(what: str = "model input"):
    """Inside the block ``torch.load`` (the unpickler behind ``.bin`` / ``.pt`` weights) raises
    :class:`CheckpointError` instead of running; restored after, however the block ends."""
    original = torch.load

    def refuse(f, *args, **kwargs):
        raise CheckpointError(f"refusing to unpickle '{f}' ({what}): secompress loads only .safetensors weights "
                              "(pickle-based files can run code when loaded)")

    torch.load = refuse
    try:
        yield
    finally:
        torch.load = original


def check_loading_info(info: dict, model: str | Path) -> None:
    """transformers' loading report after ``from_pretrained``: a weight it left at its random
    initialisation or could not place is an error (the second guard behind :func:`verify`)."""
    for what, keys in (("was not in the checkpoint (left randomly initialised)", info.get("missing_keys")),
                       ("did not match the model's shape", info.get("mismatched_keys"))):
        keys = sorted(keys or [])
        if keys:
            first = keys[0] if isinstance(keys[0], str) else keys[0][0]
            raise CheckpointError(f"checkpoint '{model}': weight '{first}' {what}" +
                                  (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "") + "; nothing was computed")
