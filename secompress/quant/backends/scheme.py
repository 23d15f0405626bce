"""The ``scheme`` backend: compressed-tensors presets with float weights or quantized activations.

    QuantConfig(scheme="FP8")                                   # method rtn (the default) hands it here
    QuantConfig(scheme="NVFP4", calibration="all-experts", options=SchemeOptions(smooth=True))
    secompress quantize MODEL --scheme FP8 [--calibration all-experts] [--option smooth=true] --out OUT

Reached through :meth:`~.rtn.RtnBackend.for_scheme` (round-to-nearest on the scheme's grid is what rtn
means for FP8 / NVFP4 / MXFP4 / INT8), never registered as a method of its own. Integer weight-only
presets (W4A16, W8A16) stay with rtn / gptq's integer codes. The per-layer step is
:class:`~secompress.quant.actapply.ActQuantStep` on the calibration stream the pass carries through the
layers quantized before (``propagated_calibration``): statistics, optional smoothing (SmoothQuant, Xiao
et al. 2023, arXiv 2211.10438; EAQuant, arXiv 2506.13329), static input scales by ``rule``, then the
layer's modules become fake-quantized ones holding the codes compressed-tensors stores.

Super Experts: the plan's protection decides the SE layers' scheme (``se_mode`` layer, the only one a
fused-MoE runtime serves): ``se_bits`` 16 keeps their experts 16-bit (in the config's ``ignore``);
``se_bits`` 8 gives them an 8-bit scheme with per-token dynamic activations
(:func:`~secompress.quant.schemes.se_scheme_for`: FP8_DYNAMIC, W8A8), its own config group.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..actquant import SERVING
from ..actstats import MASSIVE_THRESHOLD, RULES
from .base import CALIB_Q, Backend


@dataclass(frozen=True)
class SchemeOptions:
    rule: str = "max"  # static input scales: "max" over the calibration tokens (llm-compressor's min-max),
    # or "clip-massive" (massive tokens left out: they saturate instead of widening every token's grid)
    smooth: bool = False  # SmoothQuant on the attention input, EAQuant on the MoE input and down projections
    alpha: float = 0.5  # SmoothQuant migration strength
    serving: str = "layer"  # fused-MoE static input scales as served: one per layer (vLLM FP8, FlashInfer NVFP4)
    # or one per expert (vLLM / SGLang CUTLASS NVFP4); what the fake-quant forward reproduces
    massive_threshold: float = MASSIVE_THRESHOLD  # a massive token: max |h| >= this x the median token's
    batch_size: int = 8  # calibration windows per forward (the in-memory API; the CLI's --batch-size)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.serving not in SERVING:
            raise ValueError(f"serving must be one of {', '.join(SERVING)}, got {self.serving!r}")
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth must be true or false, got {self.smooth!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.massive_threshold, bool) or not isinstance(self.massive_threshold, (int, float)) \
                or self.massive_threshold <= 1:
            raise ValueError(f"massive_threshold must be a number > 1, got {self.massive_threshold!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")


class SchemeBackend(Backend):
    name = "scheme"
    options = SchemeOptions
    package, extra = "compressed_tensors", "ct"
    calibrated = True  # static scales and smoothing read calibration statistics; all-experts calibration applies
    propagated_calibration = True
    covers_uncalibrated = True  # an expert no token reached: the layer's largest input scale (what vLLM serves)
    holds_codes = True  # FP8 / INT8 / FP4 codes with their scales, written by the compressed-tensors format
    default_format = "compressed-tensors"
    load_snippet = ("import secompress\nmodel = secompress.load('PATH')  # fake-quantized: weights and activations "
                    "as the server quantizes them\n# vLLM: LLM('PATH')   SGLang: python -m sglang.launch_server "
                    "--model-path PATH")

    def for_scheme(self, scheme) -> "SchemeBackend":
        return self

    def validate(self, config) -> None:
        if config.scheme is None:
            raise ValueError("the scheme backend needs a scheme (QuantConfig(scheme='FP8'), --scheme FP8)")
        if config.avg_bits is not None:
            raise ValueError(f"scheme {config.scheme} is one format for every quantized weight; avg_bits allocates "
                             "several bit-widths: drop one of them")
        if not config.symmetric:
            raise ValueError(f"scheme {config.scheme} is symmetric (compressed-tensors presets); drop symmetric: false")
        if config.scale_dtype != "model":
            raise ValueError(f"scale_dtype applies to integer codes; scheme {config.scheme} stores its scales in the "
                             "dtypes the preset defines (drop scale_dtype)")
        if config.fallback is not None:
            raise ValueError("fallback applies to GPTQ's uncalibrated experts; a scheme's uncalibrated experts get "
                             "their layer's largest input scale (what vLLM serves)")

    def check_plan(self, plan, config) -> None:
        """Every unit is the scheme's, 16-bit, or a protected Super-Expert unit (its own 8-bit scheme)."""
        from ..schemes import get_scheme

        bits = get_scheme(config.scheme).weight_bits
        odd = sorted(n for n, b in plan.bits.items() if b not in (None, bits) and plan.source[n] != "se")
        if odd:
            raise ValueError(f"scheme {config.scheme} quantizes every weight to its {bits}-bit format; rules may keep "
                             f"weights 16-bit (=16) only, '{odd[0]}' is planned at {plan.bits[odd[0]]} bits")

    def layer_step(self, src, plan, config):
        from ..actapply import ActQuantStep
        from ..schemes import get_scheme, se_scheme_for
        from ..smoothing import SmoothConfig

        o = config.options
        scheme = get_scheme(config.scheme)
        return ActQuantStep(plan, src.adapter, scheme, None, se_scheme_for(scheme, plan.se_bits), o.rule,
                            config.calibration == "all-experts", o.serving,
                            SmoothConfig(alpha=o.alpha) if o.smooth else None, o.massive_threshold,
                            stream=CALIB_Q, keep_stats=False)


BACKEND = SchemeBackend()
