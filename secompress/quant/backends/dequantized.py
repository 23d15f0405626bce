"""The ``dequantized`` export format: the dequantized checkpoint plus the packed integer codes.

The checkpoint is written in the original dtype and layout (stock ``from_pretrained`` loads it)
with the packed codes in ``secompress_quant.safetensors``, from which :meth:`DequantizedFormat.load`
(``secompress.load``) rebuilds the integer-coded modules. Any backend whose results hold
secompress's codes (rtn, gptq) can be written this way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...checkpoints import check_model, write_legacy_config_keys
from ...errors import SecompressError
from ...layout import PROJ, PerExpertExperts
from ...outputs import atomic_dir
from .. import rtn
from ..fused import FusedQuantizedExperts
from ..modules import QuantizedLinear, apply_plan, dequantized
from ..plan import PLAN_NAME, QuantPlan
from .base import ExportFormat

FORMAT = "dequantized"
CODES_NAME = "secompress_quant.safetensors"


def quantized_tensors(model, plan: QuantPlan) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Packed codes, scales and zeros of every quantized weight, and {key: [shape, bits]}."""
    adapter = check_model(model)
    mods: dict[str, Any] = {}  # key -> QTensor or None (not quantized: an error below)
    for name, b in plan.bits.items():
        u = plan.units[name]
        if b is None:
            continue
        if u.expert is None:
            m = model.get_submodule(name)
            mods[name] = m.qtensor() if isinstance(m, QuantizedLinear) else None
        else:
            block = adapter.block_of(adapter.layers(model)[u.layer])
            assert block is not None  # a routed expert's layer has an MoE block
            qe: Any = adapter.experts_of(block)
            for p in PROJ:
                mods[f"{name}.{p}"] = qe.qtensor(u.expert, p) if isinstance(qe, FusedQuantizedExperts) else None
    tensors, shapes = {}, {}
    for key, qt in mods.items():
        if qt is None:
            raise SecompressError(f"'{key}' is planned quantized but is not: save the model quantize_ returned "
                                  "this plan for")
        tensors[f"{key}.qweight"] = rtn.pack(qt.codes.cpu(), qt.bits)
        tensors[f"{key}.scales"] = qt.scales.cpu().contiguous()
        tensors[f"{key}.zeros"] = rtn.pack(qt.zeros.cpu(), qt.bits)
        shapes[key] = [list(qt.codes.shape), list(qt.scales.shape), qt.bits]
    return tensors, shapes


class DequantizedFormat(ExportFormat):
    name = FORMAT
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # real quantized modules\n"
                    "# or, dequantized, with stock transformers:\n"
                    "from transformers import AutoModelForCausalLM\n"
                    "model = AutoModelForCausalLM.from_pretrained('PATH')")

    def check(self, config) -> None:
        if config.scheme is not None:
            from ..schemes import get_scheme

            if not get_scheme(config.scheme).weight_only_int:
                raise ValueError(f"export format {self.name} holds integer RTN / GPTQ codes; scheme {config.scheme} is "
                                 "written in compressed-tensors (drop format)")

    def save(self, model, tokenizer, plan, out, overwrite=False) -> Path:
        if any(isinstance(m, PerExpertExperts) for m in model.modules()):
            raise SecompressError("the model has per-expert modules that are not RTN-quantized: save the model that "
                                  "quantize_ returned this plan for")
        from safetensors.torch import save_file

        adapter = check_model(model)
        tensors, shapes = quantized_tensors(model, plan)  # fails before anything is written
        with atomic_dir(out, overwrite) as tmp:
            with dequantized(model):
                model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_legacy_config_keys(tmp / "config.json", model.config, adapter)
            (tmp / PLAN_NAME).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
            save_file(tensors, str(tmp / CODES_NAME), metadata={"format": "secompress-rtn", "version": "1",
                                                                "shapes": json.dumps(shapes)})
        return Path(out)

    def detect(self, path: Path) -> bool:
        return (path / CODES_NAME).is_file() and (path / PLAN_NAME).is_file()

    def load(self, path, device=None):
        from safetensors import safe_open

        from ...checkpoints import load_model

        path = Path(path)
        if not self.detect(path):
            raise SecompressError(f"'{path}' lacks {PLAN_NAME} or {CODES_NAME}: not a secompress quantized checkpoint")
        plan = QuantPlan.from_json(json.loads((path / PLAN_NAME).read_text()))
        model = load_model(path, dtype="auto", device=device)
        with safe_open(str(path / CODES_NAME), framework="pt") as f:
            shapes = json.loads(f.metadata()["shapes"])

            def make(key, w, bits):
                if key not in shapes:
                    raise SecompressError(f"{CODES_NAME} has no codes for '{key}'")
                cshape, sshape, b = shapes[key]
                if b != bits or list(w.shape) != cshape:
                    raise SecompressError(f"'{key}': stored {b}-bit {cshape} codes do not match the plan/model "
                                          f"({bits}-bit {list(w.shape)})")
                qt = rtn.QTensor(rtn.unpack(f.get_tensor(f"{key}.qweight"), b, tuple(cshape)),
                                 f.get_tensor(f"{key}.scales"),
                                 rtn.unpack(f.get_tensor(f"{key}.zeros"), b, tuple(sshape)), b)
                return rtn.QTensor(*(t.to(w.device) for t in (qt.codes, qt.scales, qt.zeros)), b)

            apply_plan(model, plan, make)
        return model, plan

    def compatibility(self, plan):
        return {"transformers": (True, "dequantized 16-bit export: stock from_pretrained loads it; "
                                       "secompress.load rebuilds the integer codes"),
                "gptqmodel": (False, "not a GPTQ checkpoint (use method 'gptq')"),
                "vllm-fused-moe": (True, "loads the dequantized 16-bit weights (no memory saving)")}




EXPORT = DequantizedFormat()
