"""``secompress.load(path)``: load any checkpoint secompress wrote, the right way."""
from __future__ import annotations

from pathlib import Path


def load(path: str | Path, dtype="auto", device: str | None = None, trust_remote_code: bool = False):
    """A quantized export comes back through the export format or backend that wrote it (each
    one's ``detect``/``load`` in :mod:`secompress.quant.backends`): a compressed-tensors export
    (RTN or GPTQ, the default) with secompress's integer-coded modules, fused experts kept fused,
    whatever its ``ignore`` list holds; a dequantized export with its real integer-coded
    modules, bitsandbytes with real ``Linear4bit`` / ``Linear8bitLt`` modules, GPTQ through
    ``GPTQModel.load`` (which patches transformers' MoE classes in this process: import order
    matters for other models); anything else through :func:`~secompress.checkpoints.load_model`: a
    pruned or untouched checkpoint through ``AutoModelForCausalLM`` with safetensors only and eager
    attention, a block-FP8 or a compressed-tensors checkpoint written by another tool
    (llm-compressor RTN/GPTQ, act-order ``g_idx``, any ``ignore`` list; :mod:`secompress.ct_read`)
    with every weight dequantized on read by compressed-tensors' own decompressors, in ``dtype``."""
    from .checkpoints import load_model
    from .quant.export import backend_of

    backend = backend_of(path)
    if backend is not None:
        return backend.load(Path(path), device=device)[0]
    return load_model(Path(path), dtype=dtype, device=device,
                      trust_remote_code=trust_remote_code)
