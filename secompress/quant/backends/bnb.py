"""The ``bnb`` backend: real bitsandbytes 4-bit (NF4/FP4) and 8-bit modules, fused experts included.

Modules in :mod:`secompress.quant.bnb`, export and reload in :mod:`secompress.quant.bnb_export`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Backend, plan_export_format

BNB_BITS = (4, 8)


@dataclass(frozen=True)
class BnbOptions:
    quant_type: str = "nf4"  # 4-bit format: nf4 | fp4

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")


class BnbBackend(Backend):
    name = "bnb"
    options = BnbOptions
    package, extra = "bitsandbytes", "bnb"
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # bitsandbytes Linear4bit / Linear8bitLt "
                    "modules\n# transformers 4.x (one bit-width): AutoModelForCausalLM.from_pretrained('PATH')")

    def validate(self, config) -> None:
        if config.bits not in BNB_BITS:
            raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits only, got bits {config.bits}")

    def for_scheme(self, scheme):
        raise ValueError(f"scheme {scheme.name} cannot be made with method bnb (bitsandbytes has its own NF4/FP4/"
                         "int8 formats); use method rtn, or drop the scheme")

    def check_plan(self, plan, config) -> None:
        from ..bnb import check_plan

        check_plan(plan)  # bitsandbytes has its own fixed blocks: no group size to check

    def layer_step(self, src, plan, config):
        from ..bnb_stream import QuantizeLayersBnb

        return QuantizeLayersBnb(src, plan, config.options.quant_type)

    def save(self, model, tokenizer, plan, out, overwrite=False) -> Path:
        from ..bnb_export import save_bnb

        return save_bnb(model, tokenizer, plan, out, overwrite)

    def detect(self, path: Path) -> bool:
        from ..bnb_export import FORMAT

        return plan_export_format(path) == FORMAT

    def load(self, path, device=None):
        from ..bnb_export import load_bnb

        return load_bnb(path, device=device)

    def compatibility(self, plan):
        widths = sorted({b for b in plan.bits.values() if b is not None})
        one = len(widths) <= 1
        return {"transformers": (one, "transformers 4.x from_pretrained (per-expert layout, 16-bit modules "
                                      "skipped); transformers 5: secompress.load" if one else
                                      f"bitsandbytes configs hold one width, the plan mixes {widths}: "
                                      "secompress.load only"),
                "gptqmodel": (False, "not a GPTQ checkpoint"),
                "vllm-fused-moe": (False, "bitsandbytes: not checked against vLLM here")}


BACKEND = BnbBackend()
