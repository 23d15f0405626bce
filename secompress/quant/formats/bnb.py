"""The ``bitsandbytes`` export format: the bnb backend's own (only its results can be written in it).

On disk the checkpoint uses the per-expert layout of transformers-4 checkpoints
(``model.layers.0.mlp.experts.5.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.5.w1``),
which is how transformers-4 and vLLM serialise bitsandbytes weights: each quantized projection is
stored as bitsandbytes writes it (4-bit: packed ``uint8`` ``weight`` plus ``weight.absmax``,
``weight.quant_map`` and ``weight.quant_state.bitsandbytes__nf4``; 8-bit: ``int8`` ``weight`` plus
``SCB``), Super Experts planned at 16 bit and layers without planned experts as plain per-expert
tensors. ``config.json`` carries a bitsandbytes ``quantization_config`` when every quantized unit
has the same width (bitsandbytes configs have one width), with the 16-bit modules in
``llm_int8_skip_modules`` (worked out from the plan, so the meta skeleton of a streamed run gives
the same list as the quantized model), and the transformers-4 config keys. transformers 5 cannot
load it (its MoE classes keep experts fused, which bitsandbytes does not quantize);
:func:`~secompress.quant.bnb_export.load_bnb` (``secompress.load``) rebuilds the per-expert layout
with real ``Linear4bit`` / ``Linear8bitLt`` modules from the stored bytes, re-quantizing nothing.
bitsandbytes' CPU quantization is deterministic, so a streamed export equals the in-memory one.
Legend: P a weight's parameters, O its out features.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ...checkpoints import write_model_config
from ...errors import SecompressError, require
from ...layout import PROJ, PerExpertExperts
from ...streaming import disk_key
from ..bnb_export import FORMAT as STORED_FORMAT
from ..bnb_export import _targets, load_bnb
from ..plan import QuantPlan
from .base import HEADER_BYTES, ExportFormat, ExportSummary, LayerWriter, cast_floats, plan_export_format, write_plan

log = logging.getLogger(__name__)
FORMAT = "bitsandbytes"
BLOCK = 64  # bitsandbytes' 4-bit block size (one float32 absmax per block, no double quantization)
QUANT_STATE_BYTES = 16 * 4 + 80  # the 16-entry float32 quant_map and the JSON quant state, per 4-bit weight


def _fused16(model, adapter, indices) -> dict[str, nn.Module]:
    """State-dict prefix -> fused experts module of the MoE layers ``indices`` whose experts stayed fused."""
    fused = {}
    for i in indices:
        ex = adapter.experts_of(adapter.block_of(adapter.layers(model)[i]))
        if not isinstance(ex, PerExpertExperts):
            fused[f"{adapter.block_path(i)}.{adapter.experts}."] = ex
    return fused


def _collect(state: dict, adapter, fused: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors to store, keyed as on disk: a tied tensor once, fused 16-bit experts split per expert."""
    out, seen = {}, set()
    for k, v in state.items():
        if any(k.startswith(p) for p in fused):
            continue
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            if v.is_floating_point() and v.numel() and (v.data_ptr(), v.shape) in seen:
                continue  # tied to a tensor already stored (tie_weights restores it on load)
            seen.add((v.data_ptr(), v.shape))
            out[disk_key(adapter, k)] = v.detach().to("cpu").contiguous()
    for prefix, ex in fused.items():
        for k, v in PerExpertExperts(ex).state_dict(prefix=prefix).items():
            out[disk_key(adapter, k)] = v.contiguous()
    return out


def skip_modules(skeleton, plan: QuantPlan, adapter) -> list[str]:
    """Disk names of every Linear left 16-bit (transformers-4 / vLLM must not expect quant states), in
    module order: kept Linear units, the 16-bit experts of layers with quantized experts (per expert),
    the routers, every expert of layers without quantized experts. The same on the meta skeleton
    (fused experts) and on the quantized model (per-expert layers)."""
    quantized = set(_targets(plan, adapter))
    planned = {l: {plan.units[n].expert for n in names if plan.bits[n] is not None}
               for l, names in plan.moe_layers().items()}
    mixed = {f"{adapter.block_path(l)}.{adapter.experts}": l for l, es in planned.items() if es}
    names, inside = [], ()
    for name, m in skeleton.named_modules():
        if inside and name.startswith(inside):
            continue  # a per-expert layer's own modules: listed from the plan below
        if name in mixed:
            l = mixed[name]
            inside = name + "."
            names += [disk_key(adapter, f"{name}.per_expert.{e}.{p}") for e in range(m.num_experts)
                      if e not in planned[l] for p in PROJ]
        elif type(m) is nn.Linear and name not in quantized:
            names.append(disk_key(adapter, name))
    for i in adapter.moe_layer_indices(skeleton):
        # routers: nn.Linear in transformers 4, which would otherwise expect quantized weights
        for attr in (adapter.router, adapter.shared_expert_gate):
            if attr is not None:
                names.append(disk_key(adapter, f"{adapter.block_path(i)}.{attr}"))
        if not planned.get(i):  # fused 16-bit: every projection
            ex = adapter.experts_of(adapter.block_of(adapter.layers(skeleton)[i]))
            base = f"{adapter.block_path(i)}.{adapter.experts}.per_expert"
            names += [disk_key(adapter, f"{base}.{e}.{p}") for e in range(ex.num_experts) for p in PROJ]
    return list(dict.fromkeys(names))


def quantization_config(skeleton, plan: QuantPlan, adapter, spec: dict) -> dict | None:
    """A transformers-4 / vLLM bitsandbytes config, or None when the plan mixes 4 and 8 bits."""
    if len(spec["bits"]) != 1:
        return None
    four = spec["bits"] == [4]
    return {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
            "bnb_4bit_quant_type": spec["quant_type"], "bnb_4bit_compute_dtype": spec["compute_dtype"],
            "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip_modules(skeleton, plan, adapter)}


class BnbWriter(LayerWriter):
    format = FORMAT

    def __init__(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None):
        super().__init__(folder, skeleton, plan, dtype, tokenizer, source, source_size)
        bnb = require("bitsandbytes", "bnb", "saving a bitsandbytes model")
        self.kinds = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}
        self.quant_types: set[str] = set()

    def rest_tensors(self, model):
        head = self.adapter.layers_path + "."
        return cast_floats(_collect({k: v for k, v in model.state_dict().items() if not k.startswith(head)},
                                    self.adapter, {}), self.dtype)

    def layer_tensors(self, index, layer):
        """The layer's tensors; checks every planned unit of it is a bnb module first."""
        keep = set()  # bnb's own storage (packed weights, absmax, quant map, SCB): as bitsandbytes wrote it
        for name, b in _targets(self.plan.layer(index), self.adapter).items():
            try:
                m = self.model.get_submodule(name)
            except AttributeError:
                m = None
            if not isinstance(m, self.kinds[b]):
                raise SecompressError(f"'{name}' is planned at {b} bits but is a {type(m).__name__}: save the model "
                                      "quantize_(..., QuantConfig(method='bnb')) returned this plan for")
            if b == 4:
                self.quant_types.add(m.weight.quant_type)
            disk = disk_key(self.adapter, name)
            keep |= {f"{disk}.{k}" for k in m.state_dict() if k != "bias"}
        if len(self.quant_types) > 1:
            raise SecompressError(f"mixed 4-bit types {sorted(self.quant_types)} in one model")
        moe = [index] if self.adapter.block_of(layer) is not None else []
        tensors = _collect(layer.state_dict(prefix=self.layer_prefix(index)), self.adapter,
                           _fused16(self.model, self.adapter, moe))
        return cast_floats(tensors, self.dtype, keep)

    def spec(self) -> dict:
        """What the loader needs besides the tensors."""
        return {"format": STORED_FORMAT, "quant_type": next(iter(self.quant_types), "nf4"),
                "compute_dtype": str(self.dtype).removeprefix("torch."),
                "bits": sorted(set(_targets(self.plan, self.adapter).values()))}

    def write_config(self, summary: ExportSummary) -> None:
        spec = self.spec()
        qcfg = quantization_config(self.skeleton, self.plan, self.adapter, spec)
        write_model_config(self.skeleton, self.folder, self.adapter, dtype=self.dtype)
        cfg = json.loads((self.folder / "config.json").read_text())
        if qcfg is not None:
            cfg["quantization_config"] = qcfg
        cfg.setdefault("torch_dtype", spec["compute_dtype"])
        (self.folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_plan(self.folder, self.plan, {**spec, "size": summary.to_json()})
        log.info("wrote %s (bitsandbytes, bits %s)", self.folder, spec["bits"])


def bnb_bytes(skeleton, plan: QuantPlan, dtype: torch.dtype) -> int:
    """Estimated size of the export: the model's tensors in ``dtype``, each quantized weight replaced
    by its bitsandbytes storage (4-bit: P/2 bytes, a float32 absmax per block and its quant state;
    8-bit: P bytes and the float32 row scales), and the headers (fused experts stored per expert)."""
    from ...checkpoints import check_model
    from ...experts import expert_weights

    adapter = check_model(skeleton)
    el = torch.empty((), dtype=dtype, device="meta").element_size()
    total = sum(p.numel() for p in skeleton.parameters()) * el
    tensors = len(dict(skeleton.named_parameters()))
    for i in adapter.moe_layer_indices(skeleton):
        ex = adapter.experts_of(adapter.block_of(adapter.layers(skeleton)[i]))
        tensors += ex.num_experts * len(expert_weights(ex, 0)) - len(dict(ex.named_parameters()))
    for name, b in plan.bits.items():
        if b is None:
            continue
        u = plan.units[name]
        mats = [u.in_features[0]] if u.expert is None else [u.in_features[p == "down_proj"] for p in PROJ]
        per = u.params // len(mats)  # the projections of an expert have the same size
        for n_in in mats:
            total -= per * el
            if b == 4:
                total += per // 2 + (per + BLOCK - 1) // BLOCK * 4 + QUANT_STATE_BYTES
                tensors += 3
            else:
                total += per + per // n_in * 4
                tensors += 1
    return total + tensors * HEADER_BYTES


class BitsandbytesFormat(ExportFormat):
    name = FORMAT
    holds = "own"  # the bnb backend's own_format: only its results
    package, extra = "bitsandbytes", "bnb"
    writer_class = BnbWriter
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # bitsandbytes Linear4bit / Linear8bitLt "
                    "modules\n# transformers 4.x (one bit-width): AutoModelForCausalLM.from_pretrained('PATH')")

    def estimate_bytes(self, skeleton, plan, dtype, source=None) -> int:
        return bnb_bytes(skeleton, plan, dtype)

    def detect(self, path: Path) -> bool:
        return plan_export_format(path) == STORED_FORMAT

    def load(self, path, device=None):
        return load_bnb(path, device=device)

    def compatibility(self, plan):
        widths = sorted({b for b in plan.bits.values() if b is not None})
        one = len(widths) <= 1
        return {"transformers": (one, "transformers 4.x from_pretrained (per-expert layout, 16-bit modules "
                                      "skipped); transformers 5: secompress.load" if one else
                                      f"bitsandbytes configs hold one width, the plan mixes {widths}: "
                                      "secompress.load only"),
                "gptqmodel": (False, "not a GPTQ checkpoint"),
                **self._engines()}

    @staticmethod
    def _engines() -> dict:
        """vLLM / SGLang rows from the rules of :mod:`secompress.quant.compat`."""
        from ..compat import ExportFacts, report

        return report(ExportFacts(fmt="bnb"), keys={"vllm": "vllm-fused-moe"})


EXPORT = BitsandbytesFormat()
