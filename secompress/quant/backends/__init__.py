"""The registry of quantization backends: method name -> :class:`~.base.Backend`.

Adding a backend: write ``backends/NAME.py`` with a :class:`~.base.Backend` subclass (its
options dataclass, ``apply``, ``save``, ``detect``/``load``, ``compatibility``, ``load_snippet``)
ending in ``BACKEND = NameBackend()``, and add one line to ``BACKENDS`` below. ``quantize_``,
``save_quantized``, ``secompress.load``, the ``quantize`` CLI and the recipe pipeline find it by name.

Export formats of integer-coded results (backends with ``holds_codes``) are a second registry,
``FORMATS``: write ``backends/NAME.py`` with an :class:`~.base.ExportFormat` subclass ending in
``EXPORT = NameFormat()`` and add one line to ``FORMATS`` below; ``QuantConfig(format=NAME)``,
``--format NAME`` and the recipes' ``export: {format: NAME}`` then reach it.
"""
from __future__ import annotations

from . import bnb, ct, dequantized, gptq, rtn
from .base import Backend, ExportFormat, NoOptions, QuantContext

BACKENDS: dict[str, Backend] = {}
FORMATS: dict[str, ExportFormat] = {}


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


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add export format ``fmt`` under its name; a name taken already is an error."""
    if not isinstance(fmt, ExportFormat):
        raise TypeError(f"an export format is a secompress.quant.backends.base.ExportFormat, got {type(fmt).__name__}")
    if fmt.name in FORMATS or any(fmt.name == b.own_format for b in BACKENDS.values()):
        raise ValueError(f"export format '{fmt.name}' is registered already")
    FORMATS[fmt.name] = fmt
    return fmt


def formats_of(backend: Backend) -> tuple[str, ...]:
    """The export formats ``backend``'s results can be written in (empty: only its own ``save``)."""
    shared = tuple(FORMATS) if backend.holds_codes else ()
    return shared + ((backend.own_format,) if backend.own_format else ())


def resolve_format(backend: Backend, fmt: str | None) -> str | None:
    """The export format to write (None: the backend's own ``save``); ValueError naming the choices."""
    choices = formats_of(backend)
    fmt = backend.default_format if fmt is None else fmt
    if fmt is not None and fmt not in choices:
        if not choices:
            raise ValueError(f"format {fmt!r}: method '{backend.name}' has its own export only")
        raise ValueError(f"format for method '{backend.name}' must be one of {', '.join(choices)}, got {fmt!r}")
    return fmt


def exporter(meta: dict):
    """What writes, loads and reports on a plan's export: its export format (``meta['format']``) if
    that is a registered one, else the plan's backend (``meta['method']``)."""
    fmt = meta.get("format")
    return FORMATS[fmt] if fmt in FORMATS else get_backend(meta.get("method", "rtn"))


for _b in (rtn.BACKEND, gptq.BACKEND, bnb.BACKEND):  # the built-in backends, in CLI order
    register(_b)
for _f in (ct.EXPORT, dequantized.EXPORT):  # the built-in export formats, the default first
    register_format(_f)

__all__ = ["BACKENDS", "Backend", "ExportFormat", "FORMATS", "NoOptions", "QuantContext", "exporter", "formats_of",
           "get_backend", "register", "register_format", "resolve_format", "unregister"]
