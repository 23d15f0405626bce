"""``secompress.load(path)``: load any checkpoint secompress wrote, the right way."""
from __future__ import annotations

from pathlib import Path


def load(path: str | Path, dtype="auto", device: str | None = None, trust_remote_code: bool = False):
    """A compressed-tensors export (RTN or GPTQ, the default) comes back with secompress's
    integer-coded modules, fused experts kept fused (``secompress.quant.compressed_tensors.load_ct``,
    whatever its ``ignore`` list holds); a dequantized RTN export with its real integer-coded modules
    (``secompress.quant.load_quantized``); a bitsandbytes export with real ``Linear4bit`` /
    ``Linear8bitLt`` modules (``secompress.quant.bnb_export.load_bnb``); a GPTQ export through
    ``GPTQModel.load`` (which patches transformers' MoE classes in this process: import order
    matters for other models); anything
    else (a pruned or untouched checkpoint) through ``AutoModelForCausalLM`` with safetensors only
    and eager attention."""
    from .checkpoints import load_model
    from .quant.api import CODES_NAME, PLAN_NAME, load_quantized
    from .quant.bnb_export import FORMAT as BNB_FORMAT, load_bnb
    from .quant.compressed_tensors import FORMAT as CT_FORMAT

    p = Path(path)
    if (p / PLAN_NAME).is_file() and _export_format(p / PLAN_NAME) == CT_FORMAT and _compressed(p):
        from .quant.compressed_tensors import load_ct

        return load_ct(p, device=device)[0]
    if (p / CODES_NAME).is_file() and (p / PLAN_NAME).is_file():
        return load_quantized(p, device=device)[0]
    if (p / PLAN_NAME).is_file() and _export_format(p / PLAN_NAME) == BNB_FORMAT:
        return load_bnb(p, device=device)[0]
    if (p / "quantize_config.json").is_file():  # written by gptqmodel
        from .errors import require

        return require("gptqmodel", "gptq", "Loading a GPTQ checkpoint").GPTQModel.load(str(p), device=device)
    return load_model(p, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _export_format(plan_path: Path) -> str | None:
    import json

    return json.loads(plan_path.read_text()).get("export", {}).get("format")


def _compressed(path: Path) -> bool:
    """config.json still declares compressed-tensors (a dequantized copy keeps the plan file, not this)."""
    import json

    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return cfg.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
