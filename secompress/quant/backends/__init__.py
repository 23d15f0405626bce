"""The registry of quantization backends: method name -> :class:`~.base.Backend`.

Adding a backend: write ``backends/NAME.py`` with a :class:`~.base.Backend` subclass (its
options dataclass, ``apply``, ``save``, ``detect``/``load``, ``compatibility``, ``load_snippet``)
ending in ``BACKEND = NameBackend()``, and add one line to ``BACKENDS`` below. ``quantize_``,
``save_quantized``, ``secompress.load``, the ``quantize`` CLI and the recipe pipeline find it by name.
"""
from __future__ import annotations

from . import bnb, gptq, rtn
from .base import Backend, NoOptions, QuantContext

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` under its name; a name taken already is an error."""
    if not isinstance(backend, Backend):
        raise TypeError(f"a backend is a secompress.quant.backends.base.Backend, got {type(backend).__name__}")
    if backend.name in BACKENDS:
        raise ValueError(f"quantization backend '{backend.name}' is registered already")
    BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    del BACKENDS[name]


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


for _b in (rtn.BACKEND, gptq.BACKEND, bnb.BACKEND):  # the built-in backends, in CLI order
    register(_b)

__all__ = ["BACKENDS", "Backend", "NoOptions", "QuantContext", "get_backend", "register", "unregister"]
