"""The registry of export formats: name -> :class:`~.base.ExportFormat` (one per-layer writer each).

Adding a format: write ``formats/NAME.py`` with a :class:`~.base.LayerWriter` subclass
(``rest_tensors``, ``layer_tensors``, ``write_config``) and an :class:`~.base.ExportFormat`
subclass (``name``, ``holds``, ``writer_class``, ``estimate_bytes``, ``detect`` / ``load``,
``compatibility``, ``load_snippet``, optional ``check`` / ``preview``) ending in
``EXPORT = NameFormat()``, and add it to the tuple below (or :func:`register_format` it).
``QuantConfig(format=NAME)``, ``--format NAME``, the recipes' ``export: {format: NAME}``,
``save_quantized``, the streamed engine, ``secompress.load`` and the model card then find it.

Built in: ``compressed-tensors`` and ``dequantized`` (integer-coded results of rtn and gptq),
``bitsandbytes`` (the bnb backend's own) and ``plain`` (unquantized models: pruned, merged or
untouched; block-scaled FP8 sources written as stored).
"""
from __future__ import annotations

from . import bnb, ct, dequantized, plain
from .base import HOLDS, ExportFormat, ExportSummary, LayerWriter

FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add export format ``fmt`` under its name; a name taken already is an error."""
    if not isinstance(fmt, ExportFormat):
        raise TypeError(f"an export format is a secompress.quant.formats.base.ExportFormat, got {type(fmt).__name__}")
    if fmt.holds not in HOLDS:
        raise ValueError(f"export format '{fmt.name}': holds must be one of {HOLDS}, got {fmt.holds!r}")
    if fmt.name in FORMATS:
        raise ValueError(f"export format '{fmt.name}' is registered already")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    del FORMATS[name]


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown export format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


for _f in (ct.EXPORT, dequantized.EXPORT, bnb.EXPORT, plain.EXPORT):  # the default of rtn and gptq first
    register_format(_f)

__all__ = ["ExportFormat", "ExportSummary", "FORMATS", "LayerWriter", "get_format", "register_format",
           "unregister_format"]
