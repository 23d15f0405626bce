"""The ``bnb`` backend: real bitsandbytes 4-bit (NF4/FP4) and 8-bit modules, fused experts included.

Modules in :mod:`secompress.quant.bnb`; its results are written in its own export format,
``bitsandbytes`` (:mod:`secompress.quant.formats.bnb`, reloaded by :mod:`secompress.quant.bnb_export`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Backend

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
    own_format = default_format = "bitsandbytes"  # its export format (formats/bnb.py): only its results

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


BACKEND = BnbBackend()
