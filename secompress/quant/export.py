"""``save_quantized`` / ``load_quantized``: the export and reload of whichever backend made the plan.

    save_quantized(model, tokenizer, plan, "out/")   # the backend named in plan.meta["method"]
    model, plan = load_quantized("out/")             # the backend whose checkpoint "out/" holds
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SecompressError
from .backends import BACKENDS, Backend, get_backend
from .plan import QuantPlan


def save_quantized(model, tokenizer, plan: QuantPlan, out: str | Path, overwrite: bool = False) -> Path:
    """Write atomically to ``out``, with ``quantization_plan.json``, in the format of the plan's backend.

    rtn: the dequantized checkpoint (stock ``from_pretrained`` loads it) plus the packed codes;
    bnb: the bitsandbytes serialisation in the per-expert layout; gptq: gptqmodel's checkpoint.
    """
    return get_backend(plan.meta.get("method", "rtn")).save(model, tokenizer, plan, out, overwrite)


def backend_of(path: str | Path) -> Backend | None:
    """The backend whose checkpoint ``path`` holds, or None (an unquantized checkpoint)."""
    p = Path(path)
    return next((b for b in BACKENDS.values() if b.detect(p)), None)


def load_quantized(path: str | Path, device: str | None = None):
    """Load a :func:`save_quantized` checkpoint with its real quantized modules; returns (model, plan)."""
    backend = backend_of(path)
    if backend is None:
        raise SecompressError(f"'{path}' is not a secompress quantized checkpoint (no quantization_plan.json "
                              "with codes, bitsandbytes export or GPTQ config)")
    return backend.load(path, device=device)
