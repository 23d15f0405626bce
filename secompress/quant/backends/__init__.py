"""The registry of quantization backends: method name -> :class:`~.base.Backend`.

Adding a backend: write ``backends/NAME.py`` with a :class:`~.base.Backend` subclass (its
options dataclass, ``apply``, ``save``, ``detect``/``load``, ``compatibility``, ``load_snippet``)
ending in ``BACKEND = NameBackend()``, and add one line to ``BACKENDS`` below. ``quantize_``,
``save_quantized``, ``secompress.load``, the ``quantize`` CLI and the recipe pipeline find it by name.

Export formats are a second registry, ``FORMATS`` (:mod:`secompress.quant.formats`, one per-layer
writer each): a backend with ``holds_codes`` can be written in every format that ``holds`` codes
(compressed-tensors, dequantized), and in its ``own_format`` (bnb: ``bitsandbytes``, a registered
format).
"""
from __future__ import annotations

from ..formats import FORMATS, ExportFormat, register_format, unregister_format
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


def formats_of(backend: Backend) -> tuple[str, ...]:
    """The export formats ``backend``'s results can be written in: every format holding integer codes
    (when the backend's results hold them), then its own format."""
    shared = tuple(n for n, f in FORMATS.items() if f.holds == "codes") if backend.holds_codes else ()
    return shared + ((backend.own_format,) if backend.own_format else ())


def resolve_format(backend: Backend, fmt: str | None) -> str | None:
    """The export format to write (None: the backend's own ``save``); ValueError naming the choices."""
    choices = formats_of(backend)
    fmt = backend.default_format if fmt is None else fmt
    if fmt is not None and fmt not in choices:
        if not backend.holds_codes:
            raise ValueError(f"format {fmt!r}: method '{backend.name}' has its own export only "
                             f"({', '.join(choices) or 'its save'})")
        raise ValueError(f"format for method '{backend.name}' must be one of {', '.join(choices)}, got {fmt!r}")
    return fmt


def exporter(meta: dict):
    """What writes, loads and reports on a plan's export: its export format (``meta['format']``; a plan
    that names none: the backend's own format when that is a registered one, e.g. bnb's) if that is a
    registered one, else the plan's backend (``meta['method']``)."""
    backend = get_backend(meta.get("method", "rtn"))
    fmt = meta.get("format") or backend.own_format
    return FORMATS[fmt] if fmt in FORMATS else backend


for _b in (rtn.BACKEND, gptq.BACKEND, bnb.BACKEND):  # the built-in backends, in CLI order
    register(_b)

__all__ = ["BACKENDS", "Backend", "ExportFormat", "FORMATS", "NoOptions", "QuantContext", "exporter", "formats_of",
           "get_backend", "register", "register_format", "resolve_format", "unregister", "unregister_format"]
