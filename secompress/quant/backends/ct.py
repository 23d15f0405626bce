"""The ``compressed-tensors`` export format (``pack-quantized``): what vLLM, SGLang and transformers load.

The machinery is :mod:`secompress.quant.compressed_tensors` (written with the compressed-tensors
library, read back by :func:`~secompress.quant.compressed_tensors.load_ct`). Fused-MoE runtimes
serve one scheme per MoE layer, so this format protects Super Experts per layer: ``se_mode``
defaults to ``layer`` and ``se_mode: expert`` is refused before anything is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..compressed_tensors import FORMAT, SE_MODE_ERROR, load_ct, save_ct
from .base import ExportFormat, plan_export_format


class CompressedTensorsFormat(ExportFormat):
    name = FORMAT
    package, extra = "compressed_tensors", "ct"
    default_se_mode = "layer"
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # integer codes, experts fused; any ignore "
                    "list\n# vLLM: LLM('PATH')   SGLang: python -m sglang.launch_server --model-path PATH\n"
                    "# transformers (when the compatibility report says yes): "
                    "AutoModelForCausalLM.from_pretrained('PATH')")

    def check(self, config) -> None:
        if config.protect_super_experts and config.se_mode == "expert":
            raise ValueError(SE_MODE_ERROR)

    def save(self, model, tokenizer, plan, out, overwrite=False) -> Path:
        """Integer codes (rtn, gptq, W4A16) with :func:`save_ct`; a scheme plan (FP8, NVFP4, ...: the
        scheme backend's fake-quantized modules) with :func:`~secompress.quant.scheme_export.save_schemes`."""
        from ..scheme_export import plan_scheme, save_schemes

        if plan_scheme(plan) is not None:
            return save_schemes(model, tokenizer, plan, out, overwrite)
        return save_ct(model, tokenizer, plan, out, overwrite)

    def detect(self, path: Path) -> bool:
        """The plan says compressed-tensors and config.json still declares it (a copy dequantized with
        compressed-tensors' own tool keeps the plan file, not this: it loads as a plain checkpoint)."""
        if plan_export_format(path) != FORMAT or not (path / "config.json").is_file():
            return False
        cfg = json.loads((path / "config.json").read_text())
        return cfg.get("quantization_config", {}).get("quant_method") == FORMAT

    def load(self, path, device=None):
        from ..plan import PLAN_NAME, QuantPlan
        from ..scheme_export import load_schemes, plan_scheme

        if plan_scheme(QuantPlan.from_json(json.loads((Path(path) / PLAN_NAME).read_text()))) is not None:
            return load_schemes(path, device=device)
        return load_ct(path, device=device)

    def compatibility(self, plan):
        """The report :func:`~secompress.quant.compressed_tensors.save_ct` derived from the written config
        (empty before the export is written: it depends on the config, not only on the plan)."""
        return dict(plan.artifacts.get("compatibility", {}))


EXPORT = CompressedTensorsFormat()
