"""``save_quantized`` / ``load_quantized``: the export and reload of whichever backend made the plan.

    save_quantized(model, tokenizer, plan, "out/")   # the backend named in plan.meta["method"]
    model, plan = load_quantized("out/")             # the backend whose checkpoint "out/" holds
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SecompressError
from .backends import BACKENDS, FORMATS, Backend, ExportFormat, exporter
from .plan import QuantPlan


def save_quantized(model, tokenizer, plan: QuantPlan, out: str | Path, overwrite: bool = False,
                   dtype=None, source: str | Path | None = None) -> Path:
    """Write atomically to ``out``, with ``quantization_plan.json``, in the plan's export format.

    rtn / gptq (``plan.meta['format']``): compressed-tensors ``pack-quantized`` (the default; vLLM,
    SGLang), ``dequantized`` (the dequantized checkpoint plus the packed codes); bnb: ``bitsandbytes``
    (the per-expert layout). A format runs its per-layer writer over the model (:meth:`~secompress.quant.formats.base.ExportFormat.save`):
    16-bit tensors in ``dtype`` (None: the source checkpoint's own 16-bit dtype, ``source`` None: the
    folder the model was loaded from); the :class:`~secompress.quant.formats.base.ExportSummary`
    (bytes, ratio to the source) is then ``plan.artifacts['export']``.
    """
    ex = exporter(plan.meta)
    if isinstance(ex, ExportFormat):
        return ex.save(model, tokenizer, plan, out, overwrite, dtype=dtype, source=source)
    return ex.save(model, tokenizer, plan, out, overwrite)


def backend_of(path: str | Path) -> Backend | ExportFormat | None:
    """The export format or backend whose checkpoint ``path`` holds, or None (an unquantized checkpoint)."""
    p = Path(path)
    found: list[Backend | ExportFormat] = [*FORMATS.values(), *BACKENDS.values()]
    return next((b for b in found if b.detect(p)), None)


def load_quantized(path: str | Path, device: str | None = None):
    """Load a :func:`save_quantized` checkpoint with its real quantized modules; returns (model, plan)."""
    backend = backend_of(path)
    if backend is None:
        raise SecompressError(f"'{path}' is not a secompress quantized checkpoint (no quantization_plan.json "
                              "with codes, compressed-tensors or bitsandbytes export, or GPTQ config)")
    return backend.load(path, device=device)
