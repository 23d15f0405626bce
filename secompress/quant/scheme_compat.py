"""Which runtimes serve a scheme export (FP8, NVFP4, ...): runtime -> (serves it, why), from their code.

    report = compatibility(qc.model_dump(), assignments, adapter, model)

Read for this module (paths in the runtimes' repositories; the kernels' hardware floors are theirs):

- vLLM ``model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py``
  ``get_moe_method``: each fused MoE layer's scheme is read from expert 0's gate/up/down names; an ignored
  layer is served unquantized (``UnquantizedFusedMoEMethod``), so 16-bit Super-Expert layers next to
  quantized ones load. Per kind: MXFP4 (``_is_mxfp4``) -> ``CompressedTensorsW4A4Mxfp4MoEMethod``; NVFP4 /
  NVFP4A16 -> ``CompressedTensorsW4A4Nvfp4MoEMethod`` (per-expert input global scales for CUTLASS, the
  layer's for FlashInfer); FP8 tensor / channel / block -> ``CompressedTensorsW8A8Fp8MoEMethod`` (static
  input scales: the max over the layer's experts); INT8 channel weights with dynamic per-token inputs ->
  ``CompressedTensorsW8A8Int8MoEMethod`` (static INT8 inputs: "Unsupported FusedMoe scheme"); W4AFP8 ->
  ``CompressedTensorsW4A8Fp8MoEMethod`` (SM90 only). Linear layers: ``schemes/compressed_tensors_w8a8_fp8.py``,
  ``..._w8a8_int8.py`` (static or dynamic), ``..._w4a4_nvfp4.py``, ``..._w4a4_mxfp4.py``.
- SGLang ``srt/layers/quantization/compressed_tensors/compressed_tensors.py`` ``get_moe_scheme`` (releases
  with ``schemes/compressed_tensors_*_moe.py``): per layer from expert 0 as vLLM, ignored layer -> None
  (unquantized); NVFP4 -> ``CompressedTensorsW4A4Nvfp4MoE`` (CUTLASS per-expert / FlashInfer-TRTLLM layer
  input global scale); FP8 tensor, channel + per-token, block -> ``CompressedTensorsW8A8Fp8MoE`` (static
  scales: max over experts); INT8 dynamic -> "implemented only for NPU"; no W4A4 MXFP4 MoE scheme.
  Older releases (``compressed_tensors_moe.py`` adapted from vLLM 0.8.2) take every MoE layer's scheme from
  the ``Linear`` group: an ignored or FP8_DYNAMIC Super-Expert layer is not honoured there.
- transformers 5.24 with compressed-tensors 0.20.1, tried here on llm-compressor 0.14 exports and on
  secompress's of a tiny Qwen3-MoE (tests/test_actquant_product.py loads them): float schemes are
  decompressed to dense 16-bit weights (activations unquantized). FP8 exports load with 16-bit
  (ignored) Super-Expert layers and with an FP8_DYNAMIC group next to the FP8 one; the packed FP4
  formats (NVFP4, MXFP4) load only as one scheme over every expert layer: an ignored expert layer or a
  second group fails on the fused experts ("Concatenate on tensors destined for ...gate_up_proj. Ckpt
  contains: 0"); ``int-quantized`` (W8A8) fails the same way everywhere.
"""
from __future__ import annotations

import json

from ..layout import PROJ
from ..streaming import disk_key
from .schemes import Scheme


def kind(s: Scheme) -> str:
    """The runtimes' name for a scheme's family (what their dispatchers test)."""
    w, a = s.weights, s.inputs
    if w.type == "float" and w.num_bits == 4:
        return "mxfp4" if w.is_mx else "nvfp4"
    if w.type == "float":
        return "fp8-block" if w.block else "fp8"
    if a is None:
        return "wna16"
    if a.type == "float":
        return "w4afp8"
    return "int8-static" if a.static else "int8-dynamic"


# kind -> (fused MoE layer, Linear layer): (served, the class that serves it, or why not)
VLLM = {
    "fp8": ((True, "CompressedTensorsW8A8Fp8MoEMethod; FP8 compute on SM89+"), (True, "CompressedTensorsW8A8Fp8")),
    "fp8-block": ((True, "CompressedTensorsW8A8Fp8MoEMethod (128x128 blocks)"), (True, "CompressedTensorsW8A8Fp8")),
    "int8-dynamic": ((True, "CompressedTensorsW8A8Int8MoEMethod"), (True, "CompressedTensorsW8A8Int8")),
    "int8-static": ((False, "fused INT8 MoE needs dynamic per-token inputs"), (True, "CompressedTensorsW8A8Int8")),
    "nvfp4": ((True, "CompressedTensorsW4A4Nvfp4MoEMethod; FP4 compute on SM100"),
              (True, "CompressedTensorsW4A4Fp4 / W4A16Fp4")),
    "mxfp4": ((True, "CompressedTensorsW4A4Mxfp4MoEMethod"), (True, "CompressedTensorsW4A4MXFp4 / W4A16Mxfp4")),
    "w4afp8": ((True, "CompressedTensorsW4A8Fp8MoEMethod, SM90 only"), (True, "CompressedTensorsW4A8Fp8")),
    "wna16": ((True, "WNA16 Marlin / Triton MoE"), (True, "CompressedTensorsWNA16")),
}
SGLANG = {
    "fp8": ((True, "CompressedTensorsW8A8Fp8MoE"), (True, "CompressedTensorsW8A8Fp8")),
    "fp8-block": ((True, "CompressedTensorsW8A8Fp8MoE (block)"), (True, "CompressedTensorsW8A8Fp8")),
    "int8-dynamic": ((False, "the W8A8 INT8 fused MoE scheme is implemented for NPU only"),
                     (True, "CompressedTensorsW8A8Int8")),
    "int8-static": ((False, "fused INT8 MoE needs dynamic per-token inputs"), (True, "CompressedTensorsW8A8Int8")),
    "nvfp4": ((True, "CompressedTensorsW4A4Nvfp4MoE"), (True, "CompressedTensorsW4A4Fp4")),
    "mxfp4": ((False, "no compressed-tensors W4A4 MXFP4 MoE scheme in get_moe_scheme"), (False, "not found")),
    "w4afp8": ((False, "not dispatched by get_moe_scheme on GPU"), (False, "not found")),
    "wna16": ((True, "CompressedTensorsWNA16MoE (Marlin)"), (True, "CompressedTensorsWNA16")),
}
TRANSFORMERS_DENSE = ("fp8", "fp8-block", "nvfp4", "mxfp4")  # decompressed into 16-bit weights on load
TRANSFORMERS_MIXED = ("fp8", "fp8-block")  # ... also next to ignored expert layers or another group


def _runtime(table: dict, used: dict[str, tuple[Scheme, bool, bool]]) -> tuple[bool, str]:
    why, ok = [], True
    for name, (s, moe, lin) in used.items():
        for where, flag, (good, cls) in (("MoE", moe, table[kind(s)][0]), ("Linear", lin, table[kind(s)][1])):
            if flag:
                ok &= good
                why.append(f"{name} {where}: {cls}")
    return ok, "; ".join(why)


def config_problems(qcfg: dict, assignments: dict[int, dict[str, Scheme | None]], adapter) -> list[str]:
    """Where the written config does not serve a module with its assigned scheme, resolved as vLLM does
    (ignore, then a group naming it, then ``Linear``; a fused MoE layer by its expert 0)."""
    from .compressed_tensors import _expert_disk, scheme_of

    def args(s: Scheme | None):
        return None if s is None else json.loads(s.ct_json)["weights"]

    out = []
    for i, asg in assignments.items():
        for name, s in asg.items():
            names = [_expert_disk(adapter, i, 0, p) for p in PROJ] if name == adapter.experts else \
                [disk_key(adapter, f"{adapter.layers_path}.{i}.{name}")]
            for n in names:
                g = scheme_of(qcfg, n)
                got = None if g is None else {k: v for k, v in qcfg["config_groups"][g]["weights"].items()}
                want = args(s)
                if (got is None) != (want is None) or (got is not None and any(got.get(k) != v for k, v in want.items())):
                    out.append(f"{n}: the config serves it as {g or 'unquantized'}, assigned {s.name if s else '16-bit'}")
    return out


def compatibility(qcfg: dict, assignments: dict[int, dict[str, Scheme | None]], adapter) -> dict[str, tuple[bool, str]]:
    """runtime -> (loads it, why) for a scheme export with this config and per-layer assignment."""
    problems = config_problems(qcfg, assignments, adapter)
    if problems:
        bad = (False, "; ".join(problems[:3]))
        return {"transformers": bad, "vllm": bad, "sglang": bad, "secompress.load": (True, "any export")}
    used: dict[str, tuple[Scheme, bool, bool]] = {}
    ignored = []
    for i, asg in assignments.items():
        for name, s in asg.items():
            if name == adapter.experts and s is None:
                ignored.append(i)
            if s is not None:
                _, moe, lin = used.get(s.name, (s, False, False))
                used[s.name] = (s, moe or name == adapter.experts, lin or name != adapter.experts)
    moe_schemes = sorted({s.name for a in assignments.values() for n, s in a.items() if n == adapter.experts and s})
    vllm = _runtime(VLLM, used)
    if ignored:
        vllm = (vllm[0], vllm[1] + f"; MoE layers {ignored} unquantized (16-bit Super-Expert layers, UnquantizedFusedMoEMethod)")
    sglang = _runtime(SGLANG, used)
    if ignored or len(moe_schemes) > 1:
        sglang = (sglang[0], sglang[1] + "; per-layer MoE schemes (" + (f"ignored layers {ignored}" if ignored else
                  "several MoE schemes") + ") need an SGLang release with get_moe_scheme; older ones serve the "
                  "'Linear' group everywhere")
    kinds = {kind(s) for s, _, _ in used.values()}
    if adapter.ckpt_fused_experts:
        why = (f"{adapter.model_type} checkpoints keep experts fused: the runtimes' loaders were not checked with "
               "per-expert compressed experts; use secompress.load")
        vllm, sglang, tf = (False, why), (False, why), (False, why)
    elif not kinds <= set(TRANSFORMERS_DENSE):
        tf = (False, f"transformers 5.24 keeps {sorted(kinds - set(TRANSFORMERS_DENSE))} compressed and fails on fused "
                     "experts: use secompress.load")
    elif (ignored or len(used) > 1) and not kinds <= set(TRANSFORMERS_MIXED):
        tf = (False, f"transformers 5.24 fails on packed {sorted(kinds - set(TRANSFORMERS_MIXED))} experts next to "
                     + (f"the 16-bit expert layers {ignored}" if ignored else "another scheme's layers")
                     + " ('Concatenate on tensors destined for ...gate_up_proj. Ckpt contains: 0'): use secompress.load")
    else:
        tf = (True, "AutoModelForCausalLM.from_pretrained decompresses to dense 16-bit weights (activations "
                    "unquantized: not what a server computes)")
    return {"transformers": tf, "vllm": vllm, "sglang": sglang,
            "secompress.load": (True, "fake-quantized weights and activations as vLLM serves them")}
