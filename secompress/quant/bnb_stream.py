"""bitsandbytes in the layer-by-layer engine: each layer quantized as it comes.

    plan = plan_streamed("ckpt/", StreamedJob(quant=QuantConfig(method="bnb", bits=4, group_size=None)), profile)
    res = compress_streamed(plan, eval_ids, out="out/model", tokenizer=tok)

Per decoder layer, :class:`QuantizeLayersBnb` swaps the layer's planned units for real
``Linear4bit`` / ``Linear8bitLt`` modules exactly as the in-memory backend does
(:func:`~secompress.quant.bnb.apply_bnb` on the layer's part of the plan); the evaluation windows
run through it and the ``bitsandbytes`` export format's writer (:mod:`secompress.quant.formats.bnb`,
the same as in memory) writes it. bitsandbytes' CPU quantization is deterministic, so the export is
bit-identical to the in-memory one (tested on four architectures).
"""
from __future__ import annotations

import logging

from .plan import QuantPlan

log = logging.getLogger(__name__)


class QuantizeLayersBnb:
    """Replace the layer's planned units by bitsandbytes modules (as the in-memory ``bnb`` backend)."""

    def __init__(self, eng, plan: QuantPlan, quant_type: str):
        self.eng, self.plan, self.quant_type = eng, plan, quant_type

    def on_layer(self, index: int, layer, inputs) -> None:
        from .bnb import apply_bnb

        sub = self.plan.layer(index)
        if any(b is not None for b in sub.bits.values()):
            apply_bnb(self.eng.model, sub, self.quant_type)
