"""The ``gptq`` backend: GPTQ through gptqmodel, run in a child process (see :mod:`secompress.quant.gptq`).

``apply`` hands the model's checkpoint (the untouched source folder when given, else the
model saved under ``work``) to gptqmodel with the plan's overrides, then reads the GPTQ
codes back into the model as integer-coded modules (:mod:`secompress.quant.gptq_codes`), so
it can be evaluated here and written in any export format (``compressed-tensors`` by default,
``dequantized``); format ``gptqmodel`` is ``save``: a copy of gptqmodel's checkpoint, which
``load`` reads with ``GPTQModel.load``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ...errors import SecompressError, require
from ...outputs import atomic_dir
from ..plan import PLAN_NAME, QuantPlan
from .base import Backend, QuantContext, check_group_sizes, layer_uniformity

ARTIFACT = "gptq_dir"  # plan.artifacts key: the folder gptqmodel wrote


@dataclass(frozen=True)
class GptqOptions:
    batch_size: int = 4  # calibration windows per gptqmodel forward

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")


class GptqBackend(Backend):
    name = "gptq"
    options = GptqOptions
    package, extra = "gptqmodel", "gptq"
    import_package = False  # gptqmodel patches transformers' MoE classes on import: only the child imports it
    calibrated = True
    holds_codes = True  # the GPTQ codes are read back into the model: any export format writes them
    own_format = "gptqmodel"  # save(): gptqmodel's own checkpoint, as it wrote it
    default_format = "compressed-tensors"
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # through GPTQModel.load "
                    "(pip install gptqmodel)\n# vLLM: LLM('PATH') when every MoE layer has one format (se_mode: layer)")

    def validate(self, config) -> None:
        from ..gptq import GPTQ_BITS

        if config.bits not in GPTQ_BITS:
            raise ValueError(f"GPTQ quantizes to {GPTQ_BITS} bits, got bits {config.bits}")

    def for_scheme(self, scheme):
        if not scheme.weight_only_int:
            raise ValueError(f"scheme {scheme.name} with method gptq: gptqmodel makes integer weight-only codes "
                             "(W4A16, W8A16); use method rtn for this scheme")
        return self

    def check_plan(self, plan, config) -> None:
        check_group_sizes(plan, config.group_size)

    def apply(self, model, plan, config, ctx: QuantContext) -> QuantPlan:
        from ..gptq import gptq_

        if ctx.work is None:
            raise SecompressError("GPTQ runs on a checkpoint, not in place: pass work= (a folder that keeps "
                                  "gptqmodel's checkpoint until save_quantized), or use `secompress quantize MODEL "
                                  "--method gptq`")
        gdir = gptq_(model, ctx.tokenizer, plan, config, ctx.profile, ctx.data, ctx.work, source=ctx.source)
        plan.artifacts[ARTIFACT] = gdir
        return plan

    def save(self, model, tokenizer, plan, out, overwrite=False) -> Path:
        src = plan.artifacts.get(ARTIFACT)
        if src is None or not Path(src).is_dir():
            raise SecompressError("this plan has no GPTQ checkpoint to save: save the model quantize_ (method "
                                  "'gptq', with work=) returned this plan for")
        with atomic_dir(out, overwrite) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return Path(out)

    def detect(self, path: Path) -> bool:
        return (path / "quantize_config.json").is_file()  # written by gptqmodel

    def load(self, path, device=None):
        model = require("gptqmodel", "gptq", "Loading a GPTQ checkpoint").GPTQModel.load(str(path), device=device)
        p = Path(path) / PLAN_NAME
        return model, (QuantPlan.from_json(json.loads(p.read_text())) if p.is_file() else None)

    def compatibility(self, plan):
        return {"transformers": (False, "fused experts: load with GPTQModel.load (stock from_pretrained "
                                        "re-initialises them)"),
                "gptqmodel": (True, "per-module bits via `dynamic` overrides (16-bit modules skipped)"),
                "vllm-fused-moe": layer_uniformity(plan)}


BACKEND = GptqBackend()
