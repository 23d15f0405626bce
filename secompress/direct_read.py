"""Reading byte ranges of large files with O_DIRECT, bypassing the page cache.

A streamed pass reads each byte of a checkpoint once, and the checkpoint is usually larger than
memory, so the page cache only costs: a buffered read of a file not cached spends kernel time
inserting and later evicting every page (measured on this project's CPU box, the layers of an
8-layer OLMoE-shape checkpoint, 6.2 GB: 14 s of system CPU and 59 s of wall time buffered, against
0.6 s and 10 s with O_DIRECT; ``evals/bench_profile_speed.py``). :class:`ShardReader` reads with
O_DIRECT where the file system allows it, through one aligned bounce buffer (O_DIRECT needs the
file offset, length and memory address aligned; a tensor's bytes in a safetensors file are not),
and with plain reads where it does not (tmpfs, some network file systems). Reads run without the
GIL (``os.preadv``, ``memmove``), so a prefetch thread reads while the main thread computes.
A direct read of a range just written sees the written bytes (the kernel writes back dirty pages
of the range first). One reader per thread.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and addresses (any logical block size up to a page)
BOUNCE_BYTES = 16 * 2**20  # bytes per O_DIRECT read


class ShardReader:
    """Files opened on first use, read by byte range into host tensors, closed by :meth:`close`.

    ``direct=False`` (or a file system that refuses O_DIRECT) reads through the page cache."""

    def __init__(self, direct: bool = True, bounce_bytes: int = BOUNCE_BYTES):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._files: dict[Path, tuple[object, int | None]] = {}  # path -> (buffered file, O_DIRECT fd or None)
        self._bounce_bytes = max(ALIGN, bounce_bytes // ALIGN * ALIGN)
        self._bounce: torch.Tensor | None = None  # [bounce_bytes] uint8 at an aligned address, made on first use

    def _open(self, path: Path) -> tuple[object, int | None]:
        if path not in self._files:
            fd = None
            if self.direct:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # the file system refuses O_DIRECT: plain reads
                    fd = None
            self._files[path] = (open(path, "rb"), fd)  # noqa: SIM115  (closed by close())
        return self._files[path]

    def is_direct(self, path: str | Path) -> bool:
        return self._open(Path(path))[1] is not None

    def readinto(self, path: str | Path, offset: int, dst: torch.Tensor) -> int:
        """Bytes ``[offset, offset + dst.numel())`` of the file into ``dst`` (a contiguous host uint8
        tensor); returns how many were read (fewer at the end of the file)."""
        path = Path(path)
        f, fd = self._open(path)
        if fd is not None:
            try:
                return self._read_direct(fd, offset, dst)
            except OSError:  # O_DIRECT accepted at open but refused on read: plain reads for this file
                os.close(fd)
                self._files[path] = (f, None)
        f.seek(offset)
        return f.readinto(memoryview(dst.numpy())) or 0

    def _read_direct(self, fd: int, offset: int, dst: torch.Tensor) -> int:
        if self._bounce is None:
            raw = torch.empty(self._bounce_bytes + ALIGN, dtype=torch.uint8, device="cpu")  # host: file reads
            start = -raw.data_ptr() % ALIGN
            self._bounce = raw[start:start + self._bounce_bytes]
        bounce, n, done = self._bounce, dst.numel(), 0
        view = memoryview(bounce.numpy())
        pos = offset // ALIGN * ALIGN
        while done < n:
            want = min(len(view), -(-(offset + n - pos) // ALIGN) * ALIGN)  # whole blocks up to the range's end
            got = os.preadv(fd, [view[:want]], pos)
            lo = offset + done - pos  # first wanted byte in the bounce buffer
            take = max(0, min(got - lo, n - done))
            if take:  # one thread, no GIL held (a torch copy here would start an OpenMP team beside the compute's)
                ctypes.memmove(dst.data_ptr() + done, bounce.data_ptr() + lo, take)
            done += take
            if got < want:  # end of file
                break
            pos += got
        return done

    def close(self) -> None:
        for f, fd in self._files.values():
            if fd is not None:
                os.close(fd)
            f.close()
        self._files.clear()
        self._bounce = None
