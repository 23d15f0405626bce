"""Reading compressed-tensors checkpoints, whichever tool wrote them, as plain weights.

    reader = CTReader(config["quantization_config"], headers)   # the config and headers only, no tensor
    key in reader.weights                                        # a ``<module>.weight`` it rebuilds
    w = reader.read(key, get_stored)                             # [O, In] in the scale's dtype

A checkpoint whose ``quantization_config.quant_method`` is ``compressed-tensors`` (written by
llm-compressor, by secompress's own export, ...) stores a quantized Linear ``M`` as compression
parameters instead of ``M.weight``. pack-quantized: ``M.weight_packed`` (int32), ``M.weight_scale``,
``M.weight_shape``, ``M.weight_zero_point`` when asymmetric, and ``M.weight_g_idx`` for GPTQ's
act-order "group" (llm-compressor wrote it before 0.14). float-, int- and naive-quantized:
``M.weight`` holding FP8 or int8 codes, plus ``M.weight_scale``.

Which config group serves ``M`` is resolved the way compressed-tensors resolves it when it applies
a config (``compressed_tensors.utils.match.match_targets`` and ``lifecycle.apply``). ``ignore``
comes first. Then the first match wins, in this order: a target naming ``M`` exactly, a ``re:``
target matching it (``re.match``, exact and regex targets each sorted as strings), a class
target. Only ``Linear`` is understood as a class: a stored quantized tensor is a Linear weight.
The same target in two groups belongs to the later group. Each weight is rebuilt by
compressed-tensors' own decompressor for its group's format (``BaseCompressor`` registry,
``decompress``), so it equals compressed-tensors' own dequantization (its
``CompressedTensorsDequantizer``) bit for bit.

Act-order ``g_idx``: compressed-tensors 0.19 and later no longer read it, and refuse
``actorder: group`` in a config. Its codes are put in group order (a stable argsort of ``g_idx``),
dequantized with compressed-tensors' ``dequantize`` as contiguous groups, and put back in column
order. compressed-tensors up to 0.18 did the same (``_process_group``); a ``g_idx`` holding -1
means column order there, and here too.

Refused with one line before any weight is read: sparsity compression
(``sparsity_config.format``), transforms (``transform_config``, rotated weights), and formats other
than pack-, naive-, int- and float-quantized and dense (NVFP4, MXFP4, Marlin 2:4). Activation and
KV-cache quantization (input scales and the like) are not applied: secompress computes with the
dequantized weights in 16 or 32 bits, so a W8A8 checkpoint runs as W8A16.
Legend: O out features, In in features, G groups.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .errors import SecompressError, UnsupportedQuantizationError, require

METHOD = "compressed-tensors"
READ_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized", "dense")
CODE_DTYPES = ("I8", "F8_E4M3", "F8_E5M2")  # safetensors dtypes of naive/int/float-quantized codes
G_IDX = "weight_g_idx"
_REMOVED_ACTORDER = ("group", "dynamic", True)  # GPTQ act-order with g_idx (refused by compressed-tensors >= 0.19)
_CLASS_TARGETS = ("Linear",)  # class targets a stored quantized tensor can be resolved against


def is_ct(qc) -> bool:
    """Whether a config's ``quantization_config`` (dict, transformers object or None) is compressed-tensors."""
    if qc is None:
        return False
    d = qc if isinstance(qc, dict) else qc.to_dict()
    return str(d.get("quant_method", "")).lower() == METHOD


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' ``match_name``: ``re:`` targets by ``re.match``, others by equality."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def resolve_group(module: str, groups: Mapping[str, list[str]], ignore: list[str],
                  class_targets: tuple[str, ...] = _CLASS_TARGETS) -> str | None:
    """The config group serving checkpoint module ``module`` (None: ignored, or no group targets it), as
    compressed-tensors' ``apply_quantization_config`` picks it (see the module docstring)."""
    if any(match_name(module, t) for t in ignore):
        return None
    owner: dict[str, str] = {}
    for g, targets in groups.items():
        for t in targets:
            owner[t] = g  # a target listed twice: the later group (an OrderedDict overwrite there)
    for t in sorted(owner, key=lambda x: ("re:" in x, x)):
        if match_name(module, t):
            return owner[t]
    for t in owner:
        if t in class_targets:
            return owner[t]
    return None


@dataclass(frozen=True)
class _Entry:
    module: str
    group: str
    fmt: str
    packed: bool  # pack-quantized (weight_packed) rather than codes stored as `weight`


class CTReader:
    """How to rebuild every quantized weight of one compressed-tensors checkpoint (see the module docstring).

    ``headers``: stored tensor name -> safetensors header entry (``dtype``, ``shape``). Everything is
    decided from the config and the headers; :meth:`read` reads the tensors of one weight."""

    def __init__(self, qc: dict, headers: Mapping[str, dict], where: str = "the checkpoint"):
        require("compressed_tensors", "ct", f"reading the compressed-tensors checkpoint {where}")
        from compressed_tensors.quantization import QuantizationConfig

        self.where = where
        d = copy.deepcopy(qc if isinstance(qc, dict) else qc.to_dict())
        self._refuse_unreadable(d)
        self.act_order_groups: set[str] = set()
        for g, s in (d.get("config_groups") or {}).items():
            w = s.get("weights") or {}
            if w.get("actorder") in _REMOVED_ACTORDER:  # g_idx act-order: read here, refused by the library
                w["actorder"] = None
                self.act_order_groups.add(g)
        try:
            self.config = QuantizationConfig.model_validate(d)
        except Exception as e:  # pydantic's ValidationError: one line naming the field
            first = str(e).splitlines()
            raise UnsupportedQuantizationError(
                f"{where}: its compressed-tensors quantization_config does not parse "
                f"({' '.join(first[:3])})") from None
        self.formats = {g: self._format_of(s) for g, s in self.config.config_groups.items()}
        bad = {g: f for g, f in self.formats.items() if f not in READ_FORMATS}
        if bad:
            g, f = next(iter(bad.items()))
            raise UnsupportedQuantizationError(
                f"{where}: config group '{g}' has compressed-tensors format '{f}', which secompress does not read "
                f"(it reads {', '.join(READ_FORMATS)}): dequantize it with compressed-tensors first")
        groups = {g: list(s.targets) for g, s in self.config.config_groups.items()}
        ignore = list(self.config.ignore or [])
        self.weights: dict[str, _Entry] = {}  # "<module>.weight" -> how to rebuild it
        self.consumed: set[str] = set()  # stored names that are parts of a rebuilt weight
        self.headers = headers
        for module, packed in self._quantized_modules(headers):
            g = resolve_group(module, groups, ignore)
            if g is None:
                why = "is in `ignore`" if any(match_name(module, t) for t in ignore) else \
                    "matches no config group's targets"
                raise UnsupportedQuantizationError(f"{where}: '{module}' is stored quantized but {why}: the "
                                                   "quantization_config does not describe this checkpoint")
            fmt = self.formats[g]
            if packed != (fmt == "pack-quantized"):
                raise UnsupportedQuantizationError(
                    f"{where}: '{module}' is stored {'packed' if packed else 'as codes'} but its config group '{g}' "
                    f"says format '{fmt}'")
            self.weights[f"{module}.weight"] = _Entry(module, g, fmt, packed)
            self.consumed |= {k for k in self._params(module, g) if k in headers}
        for key, e in self.weights.items():
            if f"{e.module}.{G_IDX}" in headers and e.group not in self.act_order_groups:
                self.act_order_groups.add(e.group)  # a g_idx with actorder null/weight: still honoured
        for g in self.act_order_groups:
            if self.config.config_groups[g].weights.strategy != "group":
                raise UnsupportedQuantizationError(f"{where}: config group '{g}' has act-order g_idx but strategy "
                                                   f"'{self.config.config_groups[g].weights.strategy}' (not group)")

    # ---- config ----------------------------------------------------------------------------------
    def _refuse_unreadable(self, d: dict) -> None:
        sp = d.get("sparsity_config") or {}
        if sp.get("format") not in (None, "dense"):
            raise UnsupportedQuantizationError(
                f"{self.where}: sparsity compression '{sp.get('format')}' is not read by secompress: dequantize and "
                "densify it with compressed-tensors first")
        tc = d.get("transform_config") or {}
        if tc.get("config_groups"):
            raise UnsupportedQuantizationError(
                f"{self.where}: the checkpoint has a transform_config (rotated weights, e.g. SpinQuant/QuIP); "
                "dequantized weights alone would be wrong, and secompress does not apply transforms")

    def _format_of(self, scheme) -> str:
        from compressed_tensors.compressors.format import infer_module_format

        if scheme.format is not None:
            return str(getattr(scheme.format, "value", scheme.format))
        top = self.config.format
        if top is not None and top != "mixed-precision":
            return str(getattr(top, "value", top))
        return infer_module_format(torch.nn.Linear, scheme).value

    @staticmethod
    def _quantized_modules(headers: Mapping[str, dict]):
        """(module, packed) of every module stored with compression parameters."""
        for k, info in headers.items():
            module, _, p = k.rpartition(".")
            if p == "weight_packed":
                yield module, True
            elif p == "weight" and info["dtype"] in CODE_DTYPES and f"{module}.weight_scale" in headers:
                yield module, False

    def _params(self, module: str, group: str) -> list[str]:
        from compressed_tensors.compressors import BaseCompressor

        scheme = self.config.config_groups[group]
        names = BaseCompressor.get_value_from_registry(self.formats[group]).compression_param_names(scheme)
        return [f"{module}.{n}" for n in (*names, G_IDX, "weight_zero_point")]

    def needed(self, key: str) -> list[str]:
        """The stored tensors weight ``key`` is rebuilt from (its format's compression parameters)."""
        from compressed_tensors.compressors import BaseCompressor

        e = self.weights[key]
        scheme = self.config.config_groups[e.group]
        return [f"{e.module}.{n}" for n in BaseCompressor.get_value_from_registry(e.fmt).compression_param_names(scheme)]

    # ---- what get() presents -------------------------------------------------------------------
    def info(self, key: str) -> dict:
        """Header-like ``{dtype, shape}`` of rebuilt weight ``key`` (shape from the headers: exact for grouped and
        codes-as-weight formats, within 32/bits columns for channel-wise packing)."""
        e = self.weights[key]
        h = self.headers
        scale = h[f"{e.module}.weight_scale"]
        if not e.packed:
            return {"dtype": scale["dtype"], "shape": list(h[key]["shape"])}
        args = self.config.config_groups[e.group].weights
        O, P = h[f"{e.module}.weight_packed"]["shape"]
        In = scale["shape"][-1] * args.group_size if args.strategy == "group" else P * 32 // args.num_bits
        return {"dtype": scale["dtype"], "shape": [O, In]}

    def describe(self) -> str:
        """One line: what the reader found (for logs)."""
        by = {}
        for e in self.weights.values():
            a = self.config.config_groups[e.group].weights
            label = (f"{a.type}{a.num_bits} {'sym' if a.symmetric else 'asym'} {a.strategy}"
                     + (f" {a.group_size}" if a.strategy == "group" else "")
                     + (" act-order g_idx" if e.group in self.act_order_groups else ""))
            by[label] = by.get(label, 0) + 1
        return "; ".join(f"{n} weights {label}" for label, n in sorted(by.items())) or "no quantized weight"

    # ---- read ----------------------------------------------------------------------------------
    @torch.no_grad()
    def read(self, key: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Weight ``key`` dequantized by compressed-tensors (``get``: stored name -> tensor as stored)."""
        from compressed_tensors.compressors import BaseCompressor

        e = self.weights[key]
        scheme = self.config.config_groups[e.group]
        compressor = BaseCompressor.get_value_from_registry(e.fmt)
        sd = {}
        for name in compressor.compression_param_names(scheme):
            stored = f"{e.module}.{name}"
            if stored not in self.headers:
                raise SecompressError(f"{self.where}: '{stored}' is missing (config group '{e.group}', format "
                                      f"'{e.fmt}', needs it)")
            sd[name] = get(stored)
        g_key = f"{e.module}.{G_IDX}"
        if e.packed and g_key in self.headers:
            g_idx = get(g_key)
            if not bool((g_idx == -1).any()):  # -1: column order (compressed-tensors' convention)
                return _dequantize_act_order(sd, g_idx, scheme.weights, key)
        return compressor.decompress(sd, scheme)["weight"]


def _dequantize_act_order(sd: dict, g_idx: torch.Tensor, args, key: str) -> torch.Tensor:
    """pack-quantized codes whose column j belongs to group ``g_idx[j]``: group order, dequantize, column order."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    shape = torch.Size(int(x) for x in sd["weight_shape"].tolist())  # [O, In]
    scale = sd["weight_scale"]  # [O, G]
    G = scale.shape[-1]
    g = g_idx.to(torch.long).flatten()  # [In]
    if g.numel() != shape[-1] or int(g.min()) < 0 or int(g.max()) >= G:
        raise SecompressError(f"'{key}': weight_g_idx has {g.numel()} entries in [{int(g.min())}, {int(g.max())}], "
                              f"the weight has {shape[-1]} columns and {G} groups")
    counts = torch.bincount(g, minlength=G)
    if not bool((counts == args.group_size).all()):
        raise SecompressError(f"'{key}': act-order groups of {sorted(set(counts.tolist()))} columns, the config "
                              f"says group_size {args.group_size}")
    codes = unpack_from_int32(sd["weight_packed"], args.num_bits, shape)  # int8 [O, In]
    zp = None
    if not args.symmetric:
        zp = unpack_from_int32(sd["weight_zero_point"], args.num_bits, torch.Size((*shape[:-1], G)), packed_dim=0)
    perm = torch.argsort(g, stable=True)  # columns in group order
    w = dequantize(x_q=codes.index_select(-1, perm), scale=scale, zero_point=zp, args=args)  # [O, In] group order
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


def read_config(folder) -> dict | None:
    """The ``quantization_config`` of ``folder/config.json`` when it is compressed-tensors, else None."""
    from pathlib import Path

    f = Path(folder) / "config.json"
    if not f.is_file():
        return None
    qc = json.loads(f.read_text()).get("quantization_config")
    return qc if is_ct(qc) else None
