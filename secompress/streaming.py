"""Layer-by-layer execution for checkpoints larger than memory.

The model skeleton is built with every parameter on the ``meta`` device (buffers such
as rotary frequencies stay real). One forward of the base model with the decoder
layers replaced by :class:`_Catcher` modules records what each layer receives
(hidden states, masks, position embeddings) for every calibration chunk, with no
layer weights loaded. Then each decoder layer in turn is materialised from the
safetensors shards, run over all chunks, and released. Peak memory is one layer,
the embeddings and the chunks' hidden states, whatever the depth.

Checkpoints written by transformers 5 store experts per expert
(``mlp.experts.<e>.gate_proj.weight``, Mixtral under ``block_sparse_moe...w1``); they
are fused here into the module's 3D tensors using the names the adapter declares.
"""
from __future__ import annotations

import copy
import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import MoEAdapter
from .direct_read import ShardReader
from .experts import join_gate_up, layout_of
from .errors import SecompressError
from . import fp8
from .ct_read import CTReader, is_ct
from .fp8 import SCALE_SUFFIX, BlockFP8
from .integrity import SAFETENSORS_DTYPES as _DTYPES, verify

log = logging.getLogger(__name__)


class Checkpoint:
    """Random access to the tensors of a (possibly sharded) safetensors checkpoint.

    Tensors are read with file reads into their own memory (no memory map), with O_DIRECT where
    the file system allows it (``direct=True``, :mod:`secompress.direct_read`: the page cache is
    bypassed), so a tensor costs its bytes once and nothing stays resident after it is freed.
    Each thread reads with its own files, inside its own :meth:`reading` block.
    Opening one runs :func:`secompress.integrity.verify` (once per checkpoint and process): only
    the files the index names (or ``model.safetensors``) are read, and every tensor the model
    needs is there with its shape; ``raw`` exports are checked per module.

    A block-scaled FP8 checkpoint (``quantization_config.quant_method: fp8``, see
    :mod:`secompress.fp8`) is dequantized tensor by tensor: :meth:`get` of a ``weight`` stored
    with a ``weight_scale_inv`` returns the real float32 weight; :meth:`get_stored` returns the
    bytes as stored. A compressed-tensors checkpoint (llm-compressor's, secompress's own export;
    :mod:`secompress.ct_read`) likewise: :meth:`get` of ``<module>.weight`` returns the weight
    compressed-tensors' own decompressor rebuilds from ``weight_packed`` / ``weight_scale`` / ...
    (in the scale's dtype), although no tensor of that name is stored. Any other
    quantization_config is refused (its codes are not weights), unless ``raw=True``: the caller
    reads the codes itself (bitsandbytes / GPTQ / secompress's compressed-tensors exports).
    """

    def __init__(self, path: str | Path, raw: bool = False, direct: bool = True):
        self.path = Path(path)
        # the files the index names (or model.safetensors), every tensor the model needs: one line naming what is wrong
        self.where: dict[str, tuple[Path, int, dict]] = verify(self.path, raw=raw)
        self._local = threading.local()  # open shards, per thread (a prefetch thread reads too)
        self.raw, self.direct = raw, direct
        cfg = self.path / "config.json"
        self.config: dict = json.loads(cfg.read_text()) if cfg.is_file() else {}
        qc = self.config.get("quantization_config")
        self.ct: CTReader | None = None if raw or not is_ct(qc) else CTReader(qc, self.headers(), f"'{self.path}'")
        self.fp8: BlockFP8 | None = None if raw or self.ct is not None else BlockFP8.from_config(qc)
        codes = [k for k, (_, _, v) in self.where.items()
                 if v["dtype"].startswith("F8_") and not self.is_fp8(k) and not self._rebuilt(k)]
        if codes and not raw:
            raise SecompressError(self._codes_error(codes[0]))

    def _codes_error(self, key: str) -> str:
        return (f"'{key}' in '{self.path}' is stored in FP8 without a '{key}{SCALE_SUFFIX}' block scale (or the "
                "config has no fp8 quantization_config): refusing to read FP8 codes as weights")

    def __contains__(self, key: str) -> bool:
        return key in self.where or self._rebuilt(key)

    def _rebuilt(self, key: str) -> bool:
        """Whether :meth:`get` rebuilds ``key`` from compressed-tensors parameters."""
        return self.ct is not None and key in self.ct.weights

    def headers(self) -> dict[str, dict]:
        """Stored tensor name -> its safetensors header entry (``dtype``, ``shape``, ``data_offsets``)."""
        return {k: v for k, (_, _, v) in self.where.items()}

    def tensor_infos(self) -> dict[str, dict]:
        """Name -> ``{dtype, shape}`` of every tensor as :meth:`get` returns it: compressed-tensors weights
        rebuilt (their parameters not listed), everything else as stored."""
        out = {k: v for k, v in self.headers().items() if self.ct is None or k not in self.ct.consumed}
        if self.ct is not None:
            out.update({k: self.ct.info(k) for k in self.ct.weights})
        return out

    @property
    def _reader(self) -> ShardReader | None:
        return getattr(self._local, "reader", None)

    @contextmanager
    def reading(self):
        """Keep shard files open inside the block only (this thread's files)."""
        outer, self._local.reader = self._reader, ShardReader(self.direct)
        try:
            yield self
        finally:
            self._local.reader.close()
            self._local.reader = outer

    def stored_dtype(self, key: str) -> torch.dtype:
        name = self.where[key][2]["dtype"]
        if name not in _DTYPES:
            raise SecompressError(f"'{key}': safetensors dtype {name} is not supported")
        return _DTYPES[name]

    def is_fp8(self, key: str) -> bool:
        """Whether ``key`` is a block-scaled FP8 weight (stored codes + ``<key>_scale_inv``)."""
        return self.fp8 is not None and key + SCALE_SUFFIX in self.where

    def nbytes(self, key: str) -> int:
        start, end = self.where[key][2]["data_offsets"]
        return end - start

    def get(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor's real values on ``device``: FP8 weights dequantized (float32), compressed-tensors
        weights dequantized (in their scale's dtype), everything else as stored."""
        if self.is_fp8(key):
            t = fp8.dequantize(self.get_stored(key), self.get_stored(key + SCALE_SUFFIX), self.fp8.block)
        elif self._rebuilt(key):
            t = self.ct.read(key, self.get_stored)
        else:
            t = self.get_stored(key)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and not self.raw:
                raise SecompressError(self._codes_error(key))
        return t if torch.device(device).type == "cpu" else t.to(device)

    def get_stored(self, key: str) -> torch.Tensor:
        """The tensor exactly as stored (FP8 codes stay codes)."""
        t = torch.empty(self.where[key][2]["shape"], dtype=self.stored_dtype(key), device="cpu")  # host staging
        self._read(key, t)
        return t

    def read_into(self, key: str, dest: torch.Tensor) -> None:
        """Write the tensor's real values into ``dest`` (same shape): the file's bytes straight into
        ``dest``'s memory when it is a contiguous host tensor of the stored dtype, else read and copied
        (cast, moved to its device)."""
        if self._rebuilt(key):  # compressed-tensors codes: dequantized, then copied
            t = self.get(key)
            if tuple(t.shape) != tuple(dest.shape):
                raise SecompressError(f"'{key}': checkpoint shape {tuple(t.shape)} != {tuple(dest.shape)}")
            dest.copy_(t)
            return
        if tuple(dest.shape) != tuple(self.where[key][2]["shape"]):
            raise SecompressError(f"'{key}': checkpoint shape {tuple(self.where[key][2]['shape'])} != "
                                  f"{tuple(dest.shape)}")
        if (dest.device.type == "cpu" and dest.is_contiguous() and not self.is_fp8(key)
                and dest.dtype == self.stored_dtype(key) and dest.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)):
            self._read(key, dest)
        else:
            dest.copy_(self.get(key))

    def _read(self, key: str, t: torch.Tensor) -> None:
        """The stored bytes of ``key`` into the contiguous host tensor ``t`` (file reads without the GIL)."""
        if self._reader is None:
            raise RuntimeError("Checkpoint.get outside 'with checkpoint.reading()'")
        f, base, info = self.where[key]
        start, end = info["data_offsets"]
        if end > start:
            buf = (t.view(-1) if t.dim() else t.view(1)).view(torch.uint8)
            if self._reader.readinto(f, base + start, buf) != end - start:
                raise SecompressError(f"'{f}' is truncated at tensor '{key}'")


@contextmanager
def params_on_meta():
    """Every parameter registered inside the block is created on ``meta``; buffers stay real."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config, dtype: torch.dtype | None = None):
    """The model of ``config`` with every parameter on ``meta`` (in ``dtype`` when given: what
    materialising gives them, so sizes computed on it are the real ones). A compressed-tensors
    ``quantization_config`` is dropped from the skeleton's config: :class:`Checkpoint` dequantizes
    those weights on read, so once materialised they are real (and a config written from the
    skeleton must not claim otherwise). A block-FP8 one stays: a pruned FP8 checkpoint is written
    FP8, its codes copied (:mod:`secompress.quant.formats.plain`)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "eager"
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    qc = getattr(model.config, "quantization_config", None)
    if is_ct(qc):
        if model.config is config:
            model.config = copy.deepcopy(config)
        del model.config.quantization_config
    if dtype is not None:
        for mod in model.modules():
            for n, p in list(mod._parameters.items()):
                if p is not None and p.is_floating_point():
                    mod._parameters[n] = nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta"),
                                                      requires_grad=False)
    return model.eval()


def _expert_tensor(ckpt: Checkpoint, adapter: MoEAdapter, layer_prefix: str, experts: nn.Module,
                   pname: str, shape: tuple, dtype, device) -> torch.Tensor | None:
    """Fill a fused [E, ...] tensor from per-expert checkpoint keys, or None if absent. On the host,
    in the stored dtype and layout (gate rows then up rows, not transposed), each expert's tensors
    are read straight into their rows; otherwise read, joined and copied."""
    gate_n, up_n, down_n = adapter.ckpt_expert_names
    base = f"{layer_prefix}{adapter.ckpt_block}.{adapter.experts}"
    lay = layout_of(experts)
    transposed = lay.transposed and not pname.endswith("_bias")
    suffix = "bias" if pname.endswith("_bias") else "weight"
    parts = (gate_n, up_n) if pname.startswith("gate_up_proj") else (down_n,)
    if f"{base}.0.{parts[0]}.{suffix}" not in ckpt:
        return None
    out = torch.empty(shape, dtype=dtype, device=device)  # [E, 2I, H] / [E, H, I] (transposed: last two swapped)
    in_rows = not transposed and (lay.concatenated or len(parts) == 1)
    for e in range(shape[0]):
        keys = [f"{base}.{e}.{n}.{suffix}" for n in parts]
        if in_rows:  # gate rows [:I], up rows [I:] (or the one tensor), in place
            for key, rows in zip(keys, out[e].chunk(len(keys), dim=0)):
                ckpt.read_into(key, rows)
            continue
        ws = [ckpt.get(k, device) for k in keys]  # [I, H] each, or [H, I]
        w = join_gate_up(*ws, lay.concatenated) if len(ws) == 2 else ws[0]
        out[e].copy_(w.T if transposed else w)
    return out


def disk_name(adapter: MoEAdapter, rel: str) -> str:
    """Module-relative name -> name on disk for renamed MoE blocks (:meth:`MoEAdapter.disk_name`)."""
    return adapter.disk_name(rel)


def disk_key(adapter: MoEAdapter, name: str) -> str:
    """Model-tree tensor or module name -> checkpoint name (:meth:`MoEAdapter.disk_key`)."""
    return adapter.disk_key(name)


@torch.no_grad()
def materialise(module: nn.Module, prefix: str, ckpt: Checkpoint, adapter: MoEAdapter, dtype,
                device: torch.device | str = "cpu") -> None:
    """Load every parameter (and stored buffer) of ``module`` from the checkpoint onto ``device``."""
    with ckpt.reading():
        _materialise(module, prefix, ckpt, adapter, dtype, device)


def _materialise(module: nn.Module, prefix: str, ckpt: Checkpoint, adapter: MoEAdapter, dtype,
                 device: torch.device | str = "cpu") -> None:
    assign(module, read_module(module, prefix, ckpt, adapter, dtype, device))


@torch.no_grad()
def read_module(module: nn.Module, prefix: str, ckpt: Checkpoint, adapter: MoEAdapter, dtype,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inside ``ckpt.reading()``: the tensors of every parameter of ``module`` still on meta (floating
    point ones in ``dtype``) and of every stored buffer, on ``device``, by module-relative name, for
    :func:`assign`. ``module`` itself is only read (a prefetch thread may call this)."""
    out = {}
    for mod_name, mod in module.named_modules():
        rel_mod = f"{mod_name}." if mod_name else ""
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":  # already loaded (e.g. a quantized module)
                continue
            rel = rel_mod + pname
            t, owned = None, False
            if pname in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") and \
                    hasattr(mod, "num_experts") and f"{prefix}{rel}" not in ckpt:
                t, owned = _expert_tensor(ckpt, adapter, prefix, mod, pname, tuple(p.shape), dtype, device), True
            else:
                for key in (f"{prefix}{rel}", f"{prefix}{disk_name(adapter, rel)}", disk_key(adapter, prefix + rel)):
                    if key in ckpt:
                        t = ckpt.get(key, device)
                        break
            if t is None:
                raise SecompressError(f"checkpoint '{ckpt.path}' has no tensor for '{prefix}{rel}'")
            if tuple(t.shape) != tuple(p.shape):
                raise SecompressError(f"'{prefix}{rel}': checkpoint shape {tuple(t.shape)} != model {tuple(p.shape)}")
            if not owned and t.is_floating_point():
                t = t.to(dtype)
            out[rel] = t
        for bname, b in list(mod._buffers.items()):
            key = f"{prefix}{rel_mod}{bname}"
            alt = f"{prefix}{disk_name(adapter, rel_mod + bname)}"
            for k in (key, alt, disk_key(adapter, key)):
                if b is not None and k in ckpt:
                    out[rel_mod + bname] = ckpt.get(k, device).to(b.dtype)
                    break
    return out


def assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set the parameters and buffers of ``module`` named in ``tensors`` (from :func:`read_module`)."""
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        mod = module.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t


def still_fits(module: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``tensors``, read from ``module`` earlier (:func:`read_module`, e.g. by a prefetch thread),
    still are what reading it now would give: a tensor for every parameter on meta, of its shape, and
    none for a parameter loaded or a module replaced since."""
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = module.get_submodule(mod_name)
        except AttributeError:
            return False
        p = mod._parameters.get(attr)
        if p is not None and (p.device.type != "meta" or tuple(p.shape) != tuple(t.shape)):
            return False
        if p is None and attr not in mod._buffers:
            return False
    return all((f"{m}.{n}" if m else n) in tensors for m, mod in module.named_modules()
               for n, p in mod._parameters.items() if p is not None and p.device.type == "meta")


@torch.no_grad()
def materialise_model(model: nn.Module, ckpt: Checkpoint, adapter: MoEAdapter, dtype) -> None:
    """Load a whole model whose parameters are on meta (e.g. after :func:`release`), layer by layer."""
    with ckpt.reading():
        for i, layer in enumerate(adapter.layers(model)):
            _materialise(layer, f"{adapter.layers_path}.{i}.", ckpt, adapter, dtype)
        materialise_rest(model, ckpt, adapter, dtype)
    model.tie_weights()  # tied output embeddings are not stored
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SecompressError(f"checkpoint '{ckpt.path}' has no tensor for '{missing[0]}'")


def materialise_rest(model: nn.Module, ckpt: Checkpoint, adapter: MoEAdapter, dtype,
                     device: torch.device | str = "cpu", skip: set[int] = frozenset()) -> None:
    """Inside ``ckpt.reading()``: every stored parameter still on meta outside the modules ``skip``
    (ids), by its checkpoint name; real buffers (rotary frequencies) are moved to ``device``.
    Tied parameters are not stored: call ``model.tie_weights()`` after."""
    for name, mod in model.named_modules():
        if id(mod) in skip:
            continue
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != torch.device(device):
                mod._buffers[bname] = b.to(device)
        for pname, p in list(mod._parameters.items()):
            key = disk_key(adapter, f"{name}.{pname}" if name else pname)
            if p is not None and p.device.type == "meta" and key in ckpt:
                t = ckpt.get(key, device)
                mod._parameters[pname] = nn.Parameter(t.to(dtype) if t.is_floating_point() else t,
                                                      requires_grad=False)


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """One decoder layer on one chunk's hidden states [B, S, H] with the arguments it was captured with."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def release(module: nn.Module) -> None:
    """Send the module's parameters back to ``meta``, freeing their memory."""
    for mod in module.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS. Without it, freed layer weights stay
    in the process's heap and resident memory creeps up with depth."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _load_libc()


class _Catcher(nn.Module):
    """Stands in for decoder layer i: records its inputs and passes the hidden states on."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model, adapter: MoEAdapter, chunks: list[torch.Tensor]):
    """Per chunk: hidden states entering layer 0 and, per layer, the other arguments it receives."""
    layers_parent, _, attr = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(layers_parent)
    real = getattr(parent, attr)
    stores = [[] for _ in range(len(real))]
    setattr(parent, attr, nn.ModuleList(_Catcher(s) for s in stores))
    try:
        for ids in chunks:
            parent(input_ids=ids, use_cache=False)
    finally:
        setattr(parent, attr, real)
    hidden = [stores[0][c][0] for c in range(len(chunks))]  # [B, S, H] per chunk
    args = [[(stores[i][c][1], stores[i][c][2]) for c in range(len(chunks))] for i in range(len(real))]
    return hidden, args


def layer_tensors(layer: nn.Module, prefix: str, ckpt: Checkpoint, adapter: MoEAdapter, dtype,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`read_module` with the checkpoint's files open in this thread (what a :class:`Prefetcher` loads)."""
    with ckpt.reading():
        return read_module(layer, prefix, ckpt, adapter, dtype, device)
