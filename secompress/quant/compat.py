"""Which runtimes load an export: the rules, each checked against a named release's code.

    facts = ExportFacts(fmt="compressed-tensors", expert_bits={0: 4, 1: None}, symmetric=True, group_size=128,
                        hidden=2048, intermediate=768)
    report(facts)          # {"vllm": (True, "..."), "sglang": (...), "transformers": (False, "... WARNING ...")}
    warnings(report(facts))  # the loud ones, logged when an export is written

Every rule is one :class:`Rule` in :data:`RULES`: the runtime, the release it was checked against
(:data:`CHECKED`), the file and function of that release that decides it, what it says (``no``:
the runtime refuses or breaks the export; ``slower``: it loads it on a slower kernel;
``warn``: it loads it wrong *without an error*, said loudly; ``yes``: a note on how it serves
it), and a test over the :class:`ExportFacts` of one export. A runtime loads an export unless a
``no`` or ``warn`` rule fires; the report text lists every rule that fired, each with its source. Sources
were read in the released packages (``pip download vllm==0.34.0 sglang==0.5.23``) and in the
installed transformers 5.24.0 and llm-compressor's 5.17.0; the transformers behaviour was also
run on tests/fixtures/peer (the numbers quoted come from there).
Legend: H hidden size (the experts' input width), I expert FFN width.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

CHECKED = {"vllm": "vLLM 0.34.0", "sglang": "SGLang 0.5.23", "transformers": "transformers 5.24.0",
           "transformers-5.17": "transformers 5.17.0"}
FORMATS = ("compressed-tensors", "dequantized", "bnb")
VERDICTS = ("no", "slower", "warn", "yes")
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MOE_BITS = (4, 8)  # what the Marlin / Triton WNA16 MoE kernels take
WARNING = "WARNING"


@dataclass(frozen=True)
class ExportFacts:
    """What the rules look at, for one export."""

    fmt: str
    expert_bits: dict = field(default_factory=dict)  # MoE layer -> its experts' bits (None: 16-bit, in `ignore`)
    linear_bits: tuple = ()  # bit-widths of the quantized Linear units outside the routed experts
    symmetric: bool = True
    group_size: int | None = None  # None: one scale per output channel
    hidden: int | None = None  # H
    intermediate: int | None = None  # I
    fused_experts: bool = False  # the architecture's checkpoints store experts fused (GPT-OSS)
    arch: str = ""
    problems: tuple = ()  # what breaks vLLM's expert-0 rule in the written config
    index: bool | None = None  # dequantized: model.safetensors.index.json is written (None: not known)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None (channel-wise), got {self.group_size!r}")
        for b in (*self.expert_bits.values(), *self.linear_bits):
            if b is not None and b not in (2, 3, 4, 8):
                raise ValueError(f"bits must be 2, 3, 4, 8 or None, got {b!r}")

    @property
    def quantized_expert_bits(self) -> list[int]:
        return sorted({b for b in self.expert_bits.values() if b is not None})

    @property
    def ignored_layers(self) -> list[int]:
        return sorted(l for l, b in self.expert_bits.items() if b is None)

    @property
    def marlin_group(self) -> int:
        return -1 if self.group_size is None else self.group_size


@dataclass(frozen=True)
class Rule:
    name: str
    runtime: str  # a key of CHECKED
    formats: tuple  # the export formats it concerns
    verdict: str  # one of VERDICTS
    source: str  # file::function in the checked release
    test: Callable[[ExportFacts], str | None]  # the reason when the rule fires, else None

    def __post_init__(self):
        if self.runtime not in CHECKED:
            raise ValueError(f"rule {self.name}: runtime must be one of {tuple(CHECKED)}, got {self.runtime!r}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"rule {self.name}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not set(self.formats) <= set(FORMATS):
            raise ValueError(f"rule {self.name}: formats must be among {FORMATS}, got {self.formats}")

    @property
    def checked(self) -> str:
        return CHECKED[self.runtime]

    def cite(self, text: str) -> str:
        return f"{text} [{self.checked}: {self.source}]"


CT, DQ, BNB = ("compressed-tensors",), ("dequantized",), ("bnb",)
_V = "vllm/model_executor/layers/"
_S = "sglang/srt/layers/"


def _moe_odd_bits(f: ExportFacts) -> str | None:
    odd = [b for b in f.quantized_expert_bits if b not in MOE_BITS]
    return f"{odd}-bit experts: the MoE kernels take 4 or 8 bits" if odd else None


def _asym(bits: int) -> Callable[[ExportFacts], str | None]:
    return lambda f: (f"asymmetric int{bits} experts (zero points)"
                      if not f.symmetric and bits in f.quantized_expert_bits else None)


def _marlin_group(f: ExportFacts) -> str | None:
    if not f.quantized_expert_bits or f.marlin_group in MARLIN_GROUP_SIZES:
        return None
    return (f"group size {f.marlin_group} is not one of {list(MARLIN_GROUP_SIZES)}: the MoE layers miss the Marlin "
            "kernel and run on the Triton WNA16 kernel")


def _marlin_hidden(f: ExportFacts) -> str | None:
    if not f.quantized_expert_bits or f.hidden is None or f.hidden % 128 == 0 or f.group_size is None:
        return None
    return (f"hidden size {f.hidden} is not a multiple of 128: the MoE layers miss the Marlin kernel and run on "
            "the Triton WNA16 kernel")


def _channel_off_marlin(f: ExportFacts) -> str | None:
    if not f.quantized_expert_bits or f.group_size is not None or f.hidden is None or f.hidden % 128 == 0:
        return None
    return (f"channel-wise scales with hidden size {f.hidden} (not a multiple of 128): Marlin refuses the shape "
            "and the other WNA16 MoE kernels take group-wise scales only (an assertion when the layer is built)")


def _sglang_shape(f: ExportFacts) -> str | None:
    if not f.quantized_expert_bits:
        return None
    odd = [] if f.marlin_group in MARLIN_GROUP_SIZES else [f"group size {f.marlin_group}"]
    odd += [f"hidden size {f.hidden}"] if f.hidden is not None and f.hidden % 128 else []
    odd += [f"expert width {f.intermediate}"] if f.intermediate is not None and f.intermediate % 64 else []
    return (" and ".join(odd) + f": the Marlin MoE kernel has instances for group sizes {list(MARLIN_GROUP_SIZES)} "
            "only and thread tiles that need hidden % 128 == 0 and expert width % 64 == 0 (per tensor-parallel "
            "rank), and SGLang neither pads nor falls back") if odd else None


def _ignored(f: ExportFacts) -> str | None:
    return f"MoE layers {f.ignored_layers} (in `ignore`) are served unquantized" if f.ignored_layers else None


def _mixed(f: ExportFacts) -> str | None:
    w = f.quantized_expert_bits
    return f"MoE layers at {w} bits side by side, each with its own scheme" if len(w) > 1 else None


def _fused(f: ExportFacts) -> str | None:
    return (f"{f.arch} keeps experts fused in its checkpoints; secompress writes them per expert and projection "
            "(experts.E.gate_proj/up_proj/down_proj)") if f.fused_experts else None


def _dense_group(f: ExportFacts) -> str | None:
    if not f.linear_bits or f.marlin_group in MARLIN_GROUP_SIZES:
        return None
    return f"quantized Linear layers with group size {f.marlin_group} miss the Marlin kernel"


def _no_index(f: ExportFacts) -> str | None:
    if f.index:
        return None
    return ("no model.safetensors.index.json" + (" (not known whether the writer adds one)" if f.index is None else "")
            + ": every *.safetensors in the folder is read, secompress_quant.safetensors too, whose tensors name no "
            "model parameter")


def _index(f: ExportFacts) -> str | None:
    return ("the index names the model shards only, so the codes file is skipped; the 16-bit weights load "
            "(no memory saving)") if f.index else None


def _tf_ignored(f: ExportFacts) -> str | None:
    if not f.ignored_layers or f.fused_experts:
        return None
    return (f"MoE layers {f.ignored_layers} in `ignore`: 5.24 refuses the export (\"Concatenate on tensors destined "
            "for ...gate_up_proj. Ckpt contains: 0\"); use secompress.load, vLLM or SGLang")


def _tf517_reinit(f: ExportFacts) -> str | None:
    if not f.ignored_layers or f.fused_experts:
        return None
    return (f"{WARNING}: transformers 5.17 loads this export WITHOUT an error and re-initialises the experts of MoE "
            f"layers {f.ignored_layers} at random (its load report lists them MISSING, and on the reference model the "
            "logits' error is 0.25 against 0.03 read correctly, evals/results/peer_exports.md). Releases between "
            "5.17 and 5.24 were not checked: do not load it with transformers before 5.24")


def _tf_mixed(f: ExportFacts) -> str | None:
    widths = sorted({*f.quantized_expert_bits, *f.linear_bits})
    return (f"{widths} bits in one export: transformers dequantizes every expert with the one scheme it resolves "
            "for experts (5.24 raises on the size mismatch; 5.17 fails with \"matrix batch sizes have to match\")"
            ) if len(widths) > 1 else None


def _tf_asym(f: ExportFacts) -> str | None:
    return ("asymmetric zero points: 5.24 and 5.17 fail converting the experts (\"automatic conversion of the "
            "weights\", tests/fixtures/peer/rtn-w4g16-asym)") if not f.symmetric and f.quantized_expert_bits else None


RULES: tuple[Rule, ...] = (
    # ---- vLLM 0.34.0 -------------------------------------------------------------------------------
    Rule("vllm.expert0", "vllm", CT, "no",
         _V + "quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py::"
         "CompressedTensorsMoEMethod.get_moe_method",
         lambda f: "; ".join(f.problems) if f.problems else None),
    Rule("vllm.moe_bits", "vllm", CT, "no",
         _V + "fused_moe/experts/marlin_moe.py::MarlinExperts._supports_quant_scheme, "
         "fused_moe/experts/triton_moe.py::TritonWNA16Experts._supports_quant_scheme", _moe_odd_bits),
    Rule("vllm.asym_int8", "vllm", CT, "no",
         _V + "fused_moe/oracle/int_wna16.py::select_wna16_moe_backend (no asymmetric int8 key in "
         "MarlinExperts/TritonWNA16Experts._supports_quant_scheme)", _asym(8)),
    Rule("vllm.asym_int4", "vllm", CT, "yes",
         _V + "fused_moe/experts/marlin_moe.py::MarlinExperts._supports_quant_scheme (kInt4StaticAsym)", _asym(4)),
    Rule("vllm.marlin_group", "vllm", CT, "slower",
         _V + "fused_moe/oracle/int_wna16.py::_backend_incompatibility_reason, "
         "quantization/utils/marlin_utils.py::check_moe_marlin_supports_config", _marlin_group),
    Rule("vllm.marlin_hidden", "vllm", CT, "slower",
         _V + "quantization/utils/marlin_utils.py::check_moe_marlin_supports_config (hidden_size % 128)",
         _marlin_hidden),
    Rule("vllm.channel_off_marlin", "vllm", CT, "no",
         _V + "quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_wna16.py::"
         "CompressedTensorsWNA16MoEMethod.__init__", _channel_off_marlin),
    Rule("vllm.ignored_layers", "vllm", CT, "yes",
         _V + "quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py::"
         "CompressedTensorsMoEMethod.get_moe_method (UnquantizedFusedMoEMethod)", _ignored),
    Rule("vllm.mixed_widths", "vllm", CT, "yes",
         _V + "quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py::"
         "CompressedTensorsMoEMethod.get_moe_method (one CompressedTensorsWNA16MoEMethod per layer)", _mixed),
    Rule("vllm.fused_experts", "vllm", CT, "no",
         "vllm/model_executor/models/gpt_oss.py::GptOssModel._get_streamed_expert_info (reads experts.E."
         "w13_weight_packed / w2_weight_packed)", _fused),
    Rule("vllm.dense_group", "vllm", CT, "slower",
         "vllm/model_executor/kernels/linear/mixed_precision/marlin.py::MarlinLinearKernel.can_implement",
         _dense_group),
    Rule("vllm.index", "vllm", DQ, "no",
         "vllm/model_executor/model_loader/weight_utils.py::filter_duplicate_safetensors_files, "
         "vllm/model_executor/models/utils.py::AutoWeightsLoader._load_module", _no_index),
    Rule("vllm.index_ok", "vllm", DQ, "yes",
         "vllm/model_executor/model_loader/weight_utils.py::filter_duplicate_safetensors_files", _index),
    Rule("vllm.bnb", "vllm", BNB, "no",
         _V + "quantization/__init__.py::QuantizationMethods, get_quantization_config (no bitsandbytes method)",
         lambda f: "vLLM 0.34 has no bitsandbytes quantization method"),
    # ---- SGLang 0.5.23 ----------------------------------------------------------------------------
    Rule("sglang.expert0", "sglang", CT, "no",
         _S + "quantization/compressed_tensors/compressed_tensors.py::CompressedTensorsConfig.get_moe_scheme",
         lambda f: "; ".join(f.problems) if f.problems else None),
    Rule("sglang.moe_bits", "sglang", CT, "no",
         _S + "quantization/compressed_tensors/schemes/compressed_tensors_wNa16_moe.py::"
         "CompressedTensorsWNA16MoE.__init__ (WNA16_SUPPORTED_BITS)", _moe_odd_bits),
    Rule("sglang.asym_int8", "sglang", CT, "no",
         _S + "moe/fused_moe_triton/fused_marlin_moe.py::get_scalar_type (assert num_bits == 4 with zero points)",
         _asym(8)),
    Rule("sglang.asym_int4", "sglang", CT, "yes",
         _S + "quantization/compressed_tensors/schemes/compressed_tensors_wNa16_moe.py::"
         "CompressedTensorsWNA16MoE.create_weights (w13/w2_weight_zero_point)", _asym(4)),
    Rule("sglang.marlin_shape", "sglang", CT, "no",
         "sglang/kernels/jit/csrc/gemm/marlin_moe/moe_wna16_marlin.cuh (COMMON_GET_IF group_blocks -1/2/4/8, "
         "small/large_batch_thread_configs, is_valid_config)", _sglang_shape),
    Rule("sglang.ignored_layers", "sglang", CT, "yes",
         _S + "quantization/compressed_tensors/compressed_tensors.py::CompressedTensorsConfig.get_quant_method "
         "(UnquantizedFusedMoEMethod when get_moe_scheme gives None)", _ignored),
    Rule("sglang.mixed_widths", "sglang", CT, "yes",
         _S + "quantization/compressed_tensors/compressed_tensors.py::CompressedTensorsConfig.get_moe_scheme "
         "(CompressedTensorsWNA16MoE with the layer's own weight_quant)", _mixed),
    Rule("sglang.fused_experts", "sglang", CT, "no",
         "sglang/srt/models/gpt_oss.py::GptOssForCausalLM._load_normal_weights (make_expert_params_mapping_fused "
         "maps only fused gate_up_proj/down_proj names; other expert tensors are skipped without an error)",
         lambda f: _fused(f) and _fused(f) + ": the per-expert tensors would be skipped without an error, leaving "
         "the experts uninitialised"),
    Rule("sglang.index", "sglang", DQ, "no",
         "sglang/srt/model_loader/weight_utils.py::filter_duplicate_safetensors_files", _no_index),
    Rule("sglang.index_ok", "sglang", DQ, "yes",
         "sglang/srt/model_loader/weight_utils.py::filter_duplicate_safetensors_files", _index),
    Rule("sglang.bnb", "sglang", BNB, "no",
         _S + "quantization/bitsandbytes.py::BitsAndBytesConfig (registered; not checked with secompress's "
         "per-expert bitsandbytes layout)", lambda f: "not checked"),
    # ---- transformers ----------------------------------------------------------------------------------
    Rule("transformers.ignored_layers", "transformers", CT, "no",
         "transformers/core_model_loading.py::log_conversion_errors (the experts' weight converter finds no "
         "packed weight)", _tf_ignored),
    Rule("transformers-5.17.reinit", "transformers-5.17", CT, "warn",
         "transformers/integrations/compressed_tensors.py::DecompressExperts.convert, "
         "utils/loading_report.py::LoadStateDictInfo.create_loading_report (MISSING: newly initialized)",
         _tf517_reinit),
    Rule("transformers.mixed", "transformers", CT, "no",
         "transformers/integrations/compressed_tensors.py::get_experts_scheme", _tf_mixed),
    Rule("transformers.asym", "transformers", CT, "no",
         "transformers/integrations/compressed_tensors.py::CompressedTensorsDequantize.convert", _tf_asym),
    Rule("transformers.fused_experts", "transformers", CT, "warn",
         "transformers/utils/loading_report.py::LoadStateDictInfo.create_loading_report (the per-expert "
         "tensors UNEXPECTED, the fused experts MISSING: newly initialized)",
         lambda f: _fused(f) and f"{WARNING}: transformers 5.24 loads it WITHOUT an error and re-initialises every "
         "expert at random (its load report lists the per-expert tensors UNEXPECTED and the fused experts MISSING)"),
)


def _check_registry(rules: tuple[Rule, ...]) -> None:
    seen = set()
    for r in rules:
        if r.name in seen:
            raise ValueError(f"compatibility rule '{r.name}' is defined twice")
        seen.add(r.name)


_check_registry(RULES)

_YES = {  # what a runtime does with an export when no `no` rule fires
    ("vllm", "compressed-tensors"): "compressed-tensors MoE: each MoE layer's scheme read from its expert 0",
    ("sglang", "compressed-tensors"): "compressed-tensors MoE: each MoE layer's scheme read from its expert 0",
    ("transformers", "compressed-tensors"): "AutoModelForCausalLM.from_pretrained dequantizes into the fused "
                                            "experts (dense 16-bit in memory)",
    ("vllm", "dequantized"): "the dequantized 16-bit weights",
    ("sglang", "dequantized"): "the dequantized 16-bit weights",
    ("transformers", "dequantized"): "stock from_pretrained loads the dequantized 16-bit weights; secompress.load "
                                     "rebuilds the integer codes",
}


def fired(facts: ExportFacts, rules: tuple[Rule, ...] = RULES) -> list[tuple[Rule, str]]:
    """(rule, reason) of every rule of ``facts.fmt`` that fires, in :data:`RULES` order."""
    out = []
    for r in rules:
        if facts.fmt in r.formats:
            why = r.test(facts)
            if why:
                out.append((r, why))
    return out


def report(facts: ExportFacts, keys: dict[str, str] | None = None,
           rules: tuple[Rule, ...] = RULES) -> dict[str, tuple[bool, str]]:
    """runtime -> (loads it, why). A runtime loads the export unless a ``no`` rule fires; ``warn`` rules (loud,
    ``WARNING:``) join the text of the runtime they name (transformers 5.17 -> transformers). ``keys`` renames
    runtimes in the result (e.g. ``{"vllm": "vllm-fused-moe"}``)."""
    hits = fired(facts, rules)
    out = {}
    for rt in ("vllm", "sglang", "transformers"):
        mine = [(r, why) for r, why in hits if r.runtime == rt or r.runtime.startswith(rt + "-")]
        if not mine and (rt, facts.fmt) not in _YES:
            continue
        ok = not any(r.verdict in ("no", "warn") for r, _ in mine)  # a silent mis-load is no load
        parts = [r.cite(why) for r, why in mine if r.verdict == "no"] if not ok else \
            ([f"{_YES[(rt, facts.fmt)]} [{CHECKED[rt]}]"] if (rt, facts.fmt) in _YES else []) + \
            [r.cite(("slower: " if r.verdict == "slower" else "") + why) for r, why in mine if r.verdict != "warn"]
        parts += [r.cite(why.replace("; ", ", ")) for r, why in mine if r.verdict == "warn"]  # one part each
        out[(keys or {}).get(rt, rt)] = (ok, "; ".join(parts))
    return out


def warnings(compat: dict) -> list[str]:
    """The loud warnings inside a report (tuples or the ``{ok, why}`` dicts written into the plan), each with
    its source (a warning's text has no "; ", which separates the parts of a report line)."""
    out = []
    for rt, v in compat.items():
        why = v["why"] if isinstance(v, dict) else v[1]
        out += [f"{rt}: {part}" for part in why.split("; ") if part.startswith(WARNING)]
    return out


def log_warnings(compat: dict, where: str) -> None:
    """Log every loud warning of ``compat`` (an export just written to ``where``) at WARNING level."""
    for w in warnings(compat):
        log.warning("%s: %s", where, w)


def rules_table(rules: tuple[Rule, ...] = RULES) -> str:
    """Markdown: every rule with the release and source it was checked against."""
    rows = ["| rule | runtime | formats | verdict | checked against | source |", "|---|---|---|---|---|---|"]
    for r in rules:
        rows.append(f"| {r.name} | {r.runtime} | {', '.join(r.formats)} | {r.verdict} | {r.checked} | "
                    f"`{r.source}` |")
    return "\n".join(rows)
