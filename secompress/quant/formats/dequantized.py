"""The ``dequantized`` export format: the dequantized checkpoint plus the packed integer codes.

The checkpoint is written in the export dtype and the original layout (stock ``from_pretrained``
loads it; ``model.safetensors.index.json`` is always written, so runtimes that otherwise read
every ``*.safetensors`` file, vLLM among them, read only the model's weights). The packed codes go
into ``secompress_codes/secompress_quant.safetensors``, a subfolder no runtime reads, from which
:meth:`DequantizedFormat.load` (``secompress.load``) rebuilds the integer-coded modules (exports
written before kept the codes file beside the weights; it is found there too). Any backend whose
results hold secompress's codes (rtn, gptq) can be written this way.
Legend: O out features, In in features, G groups.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...checkpoints import as_saved, check_model, write_model_config
from ...errors import SecompressError
from ...layout import PROJ, PerExpertExperts
from .. import rtn
from ..fused import FusedQuantizedExperts
from ..modules import QuantizedLinear, apply_plan, dequantized
from ..plan import PLAN_NAME, QuantPlan
from .base import HEADER_BYTES, ExportFormat, ExportSummary, LayerWriter, cast_floats, write_plan
from .plain import plain_bytes

FORMAT = "dequantized"
CODES_NAME = "secompress_quant.safetensors"
CODES_DIR = "secompress_codes"  # not read by runtimes that glob *.safetensors at the top
CODES_META = {"format": "secompress-rtn", "version": "1"}


def codes_file(folder: Path) -> Path | None:
    """The codes file of a dequantized export (in its subfolder, or beside the weights in older exports)."""
    for p in (Path(folder) / CODES_DIR / CODES_NAME, Path(folder) / CODES_NAME):
        if p.is_file():
            return p
    return None


def quantized_tensors(model, plan: QuantPlan) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Packed codes, scales and zeros of every quantized weight of ``plan``, and {key: [shape, bits]}."""
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


def code_specs(plan: QuantPlan, group_size: int | None):
    """Names, dtypes and shapes of the codes file (as :func:`quantized_tensors` gives them), and the shapes
    record of its metadata; from the plan alone."""
    from ...shards import TensorSpec

    specs, shapes = [], {}
    for key, (O, In), b in planned_matrices(plan):
        G = In // rtn.check_args(b, group_size, In, key)
        specs += [TensorSpec(f"{key}.qweight", torch.uint8, ((O * In * b + 7) // 8,)),
                  TensorSpec(f"{key}.scales", rtn.SCALE_DTYPE, (O, G)),
                  TensorSpec(f"{key}.zeros", torch.uint8, ((O * G * b + 7) // 8,))]
        shapes[key] = [[O, In], [O, G], b]
    return specs, shapes


def planned_matrices(plan: QuantPlan):
    """(key as :func:`quantized_tensors` names it, (O, In), bits) of every quantized weight matrix."""
    for name, b in plan.bits.items():
        if b is None:
            continue
        u = plan.units[name]
        if u.expert is None:
            yield name, (u.params // u.in_features[0], u.in_features[0]), b  # [O, In]
        else:
            H, I = u.in_features  # gate/up read H, down reads I
            for p in PROJ:
                yield f"{name}.{p}", ((H, I) if p == "down_proj" else (I, H)), b


class DequantizedWriter(LayerWriter):
    format = FORMAT
    always_index = True  # runtimes then read only the indexed weights

    def __init__(self, folder, skeleton, plan, dtype, tokenizer=None, source=None, source_size=None):
        from ...shards import ShardWriter

        super().__init__(folder, skeleton, plan, dtype, tokenizer, source, source_size)
        if any(isinstance(m, PerExpertExperts) for m in skeleton.modules()):
            raise SecompressError("the model has per-expert modules that are not RTN-quantized: save the model that "
                                  "quantize_ returned this plan for")
        specs, shapes = code_specs(plan, plan.meta.get("group_size"))
        (self.folder / CODES_DIR).mkdir(exist_ok=True)
        self.codes = ShardWriter(self.folder / CODES_DIR, specs, stem=CODES_NAME.removesuffix(".safetensors"),
                                 max_shard_bytes=1 << 62, metadata={**CODES_META, "shapes": json.dumps(shapes)})

    def rest_tensors(self, model):
        head = self.adapter.layers_path + "."
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
        return cast_floats(as_saved(model, sd), self.dtype)

    def layer_tensors(self, index, layer):
        with dequantized(self.model, layer=index):
            sd = self.adapter.layers(self.model)[index].state_dict(prefix=self.layer_prefix(index))
            out = cast_floats(as_saved(self.model, sd), self.dtype)
            del sd
        tensors, _ = quantized_tensors(self.model, self.plan.layer(index))
        for k, v in tensors.items():
            self.codes.write(k, v)
        return out

    def extra_tensor_files(self) -> list[Path]:
        return self.codes.close()

    def write_config(self, summary: ExportSummary) -> None:
        write_model_config(self.skeleton, self.folder, self.adapter, dtype=self.dtype)
        write_plan(self.folder, self.plan, {"format": FORMAT, "dtype": str(self.dtype).removeprefix("torch."),
                                            "size": summary.to_json()})


class DequantizedFormat(ExportFormat):
    name = FORMAT
    writer_class = DequantizedWriter
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

    def estimate_bytes(self, skeleton, plan, dtype, source=None) -> int:
        specs = code_specs(plan, plan.meta.get("group_size"))[0]
        return plain_bytes(skeleton, dtype) + sum(s.nbytes + HEADER_BYTES for s in specs)

    def detect(self, path: Path) -> bool:
        return codes_file(path) is not None and (path / PLAN_NAME).is_file()

    def load(self, path, device=None):
        from safetensors import safe_open

        from ...checkpoints import load_model

        path = Path(path)
        if not self.detect(path):
            raise SecompressError(f"'{path}' lacks {PLAN_NAME} or {CODES_DIR}/{CODES_NAME}: not a secompress "
                                  "quantized checkpoint")
        plan = QuantPlan.from_json(json.loads((path / PLAN_NAME).read_text()))
        model = load_model(path, dtype="auto", device=device)
        with safe_open(str(codes_file(path)), framework="pt") as f:
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
        """The rules of :mod:`secompress.quant.compat`; the writer always writes the index that keeps vLLM and
        SGLang (which otherwise read every ``*.safetensors`` of the folder) off the codes."""
        from ..compat import ExportFacts, report

        rows = report(ExportFacts(fmt=FORMAT, index=DequantizedWriter.always_index), keys={"vllm": "vllm-fused-moe"})
        return {"transformers": rows["transformers"], "gptqmodel": (False, "not a gptqmodel checkpoint"),
                "vllm-fused-moe": rows["vllm-fused-moe"], "sglang": rows["sglang"]}


EXPORT = DequantizedFormat()
