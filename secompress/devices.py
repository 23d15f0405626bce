"""The compute device, resolved in one place: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

``auto`` takes the first CUDA device when torch sees one, else the CPU. Every tensor the
layer-by-layer engine and the stages it calls create is allocated on the resolved device
(weights are read from disk into host memory and moved; hidden states stay on the device).
"""
from __future__ import annotations

import re

import torch

from .errors import SecompressError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"


def check_device(spec: str) -> None:
    """A ValueError unless ``spec`` is spelled auto | cpu | cuda | cuda:N (whether a GPU exists is checked
    when the device is resolved)."""
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec.strip().lower()):
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {spec!r}")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec``; a clear error for an unknown spec or a missing GPU."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise SecompressError(f"device must be one of {DEVICE_CHOICES}, got '{spec}'")
    if not torch.cuda.is_available():
        raise SecompressError(f"device '{spec}' was asked for but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu or auto")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        raise SecompressError(f"device '{spec}': only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", idx)
