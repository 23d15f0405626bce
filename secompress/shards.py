"""Write a safetensors checkpoint tensor by tensor, as layers finish, without holding it.

The names, dtypes and shapes of every output tensor are known before any compute (they
follow from the meta skeleton of the compressed model), so :class:`ShardWriter` lays the
shards out up front: it assigns tensors to ``<= max_shard_bytes`` shards in the given
order, writes each shard's header and reserves its size, and then writes each tensor's
bytes at its offset when :meth:`ShardWriter.write` is called, in any order. ``close``
checks that every tensor was written exactly once and writes
``model.safetensors.index.json`` (more than one shard) like ``save_pretrained`` does, so
stock ``from_pretrained`` and ``safetensors.safe_open`` read the result.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SecompressError

log = logging.getLogger(__name__)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
BUFFER_BYTES = 64 * 2**20  # PartWriter: tensors held before a file is written
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype, device="meta").element_size()


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs of (possibly meta) tensors, in their order."""
    return [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


class ShardWriter:
    """Pre-laid-out safetensors shards in ``folder``; ``stem`` 'model' gives transformers' file names."""

    def __init__(self, folder: str | Path, specs: list[TensorSpec], stem: str = "model",
                 max_shard_bytes: int = MAX_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SecompressError("ShardWriter: a tensor name appears twice")
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if groups[-1] and size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        files = [f"{stem}.safetensors"] if n == 1 else \
            [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(s.nbytes for s in specs)
        self.stem = stem
        self.where: dict[str, tuple[Path, int, TensorSpec]] = {}  # name -> (file, absolute offset, spec)
        self.files = [self.folder / f for f in files]
        meta = {"format": "pt", **(metadata or {})}
        for path, group in zip(self.files, groups):
            header, off = {"__metadata__": meta}, 0
            for s in group:
                header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                                  "data_offsets": [off, off + s.nbytes]}
                off += s.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * ((-len(blob)) % 8)  # safetensors pads the header to 8 bytes with spaces
            base = 8 + len(blob)
            with open(path, "wb") as h:
                h.write(len(blob).to_bytes(8, "little"))
                h.write(blob)
                h.truncate(base + off)  # reserve the data (sparse until written)
            for s in group:
                self.where[s.name] = (path, base + header[s.name]["data_offsets"][0], s)
        self.written: set[str] = set()
        self._handles: dict[Path, object] = {}

    @property
    def total_bytes(self) -> int:
        return self.total_size

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (on any device) at its place; its dtype and shape must match the spec."""
        if name not in self.where:
            raise SecompressError(f"ShardWriter: '{name}' is not an expected output tensor")
        if name in self.written:
            raise SecompressError(f"ShardWriter: '{name}' written twice")
        path, off, spec = self.where[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise SecompressError(f"ShardWriter: '{name}' is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                  f"{spec.dtype} {spec.shape}")
        t = tensor.detach().to("cpu").contiguous()
        buf = t.reshape(-1).view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy()
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = open(path, "r+b")
        h.seek(off)
        h.write(memoryview(buf))
        self.written.add(name)

    def close(self) -> list[Path]:
        """Check completeness, write the index (several shards); the files written."""
        for h in self._handles.values():
            h.close()
        self._handles = {}
        missing = [n for n in self.where if n not in self.written]
        if missing:
            raise SecompressError(f"ShardWriter: {len(missing)} tensors were never written, e.g. '{missing[0]}'")
        out = list(self.files)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: p.name for n, (p, _, _) in self.where.items()}}
            idx = self.folder / f"{self.stem}.safetensors.index.json"
            idx.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            out.append(idx)
        return out


class PartWriter:
    """Shards written as the tensors come, one group (a decoder layer) at a time, when their
    names and sizes are not known up front (the packed sizes of compressed-tensors and
    bitsandbytes follow from the libraries). :meth:`write_part` adds a group to a buffer that is
    written to a new file as soon as it holds ``buffer_bytes`` (a group that would take a file
    past ``max_shard_bytes`` starts a new one), so at most about ``buffer_bytes`` plus one group
    is held: small models end in one file, large ones in about one file per decoder layer.
    :meth:`close` renames the files to transformers' ``model-0000i-of-0000N.safetensors`` names
    (one file: ``model.safetensors``) and writes the index (also for one file with
    ``always_index``: a runtime that globs ``*.safetensors`` then reads only the indexed files)."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                 buffer_bytes: int = BUFFER_BYTES, always_index: bool = False):
        self.folder, self.max, self.buffer_bytes, self.always_index = Path(folder), max_shard_bytes, buffer_bytes, \
            always_index
        self.parts: list[tuple[Path, list[str], int]] = []  # (file, tensor names, bytes)
        self.names: set[str] = set()
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0

    def write_part(self, tensors: dict[str, torch.Tensor]) -> None:
        dup = self.names.intersection(tensors)
        if dup:
            raise SecompressError(f"PartWriter: '{sorted(dup)[0]}' written twice")
        for k, t in tensors.items():
            n = t.numel() * t.element_size()
            if self._buf and self._size + n > self.max:
                self._flush()
            self._buf[k] = t.detach().to("cpu").contiguous()
            self._size += n
            self.names.add(k)
        if self._size >= self.buffer_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self._buf), self._size))
        self._buf, self._size = {}, 0

    def close(self) -> list[Path]:
        self._flush()
        n = len(self.parts)
        if n == 0:
            raise SecompressError("PartWriter: nothing was written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        out = []
        for (path, _, _), name in zip(self.parts, names):
            path.rename(self.folder / name)
            out.append(self.folder / name)
        if n > 1 or self.always_index:
            index = {"metadata": {"total_size": sum(b for _, _, b in self.parts)},
                     "weight_map": {k: name for (_, keys, _), name in zip(self.parts, names) for k in keys}}
            idx = self.folder / "model.safetensors.index.json"
            idx.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            out.append(idx)
        return out
