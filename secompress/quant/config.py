"""``QuantConfig``: what ``quantize_`` does, validated when it is built (before any model is loaded)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backends import FORMATS, get_backend, resolve_format
from .formats.base import SCALE_DTYPES
from .coverage import FALLBACKS
from .plan import SE_MODES, Rule, check_bits

CALIBRATIONS = ("routed", "all-experts")
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128  # the field defaults below (a scheme may replace them)
KEEP_16 = 16  # se_bits 16 (or None) keeps the Super Experts in 16 bit; the one spelling of CLI and recipes


def backend_for(method: str, scheme: str | None):
    """The backend that makes ``scheme`` with ``method`` (whose options class a recipe or --option builds)."""
    b = get_backend(method)
    if scheme is None:
        return b
    from ..errors import SecompressError
    from .schemes import get_scheme

    try:
        return b.for_scheme(get_scheme(scheme))
    except SecompressError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # default bits of every quantizable weight (DEFAULT_BITS)
    group_size: int | None = 128  # input features per scale; None = one group per row (DEFAULT_GROUP_SIZE)
    symmetric: bool = True  # zero point fixed mid-range (what vLLM/SGLang kernels expect); API, CLI, recipes alike
    se_mode: str | None = None  # "expert": only SEs raised; "layer": every expert of an SE's layer;
    # None: the export format's choice (layer for compressed-tensors, else expert), resolved when built
    se_bits: int | None = None  # Super Experts' bits: 8, or 16 / None = keep 16-bit (stored as None)
    protect_super_experts: bool = True
    rules: tuple[Rule, ...] = ()  # exact names beat regexes beat `bits`
    avg_bits: float | None = None  # target parameter-weighted average over routed experts -> allocation
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8, 16)  # allocation choices (16 = keep)
    method: str = "rtn"  # a registered backend: secompress.quant.backends.BACKENDS
    options: Any = None  # the backend's own options dataclass (None: its defaults), e.g. BnbOptions
    fallback: str | None = None  # for experts without calibration tokens: None = error, "rtn"
    calibration: str = "routed"  # calibrated methods: "all-experts" shows every token to every expert
    format: str | None = None  # export format (secompress.quant.formats.FORMATS, or the backend's own);
    # None: the backend's default (compressed-tensors for rtn and gptq; bnb: bitsandbytes, its own)
    scale_dtype: str = "model"  # compressed-tensors' weight_scale on disk: "model" = the export dtype (what vLLM
    # computes with; llm-compressor's choice) or "float32" (secompress's exact float16 scales; 10% bigger at g32)
    scheme: str | None = None  # a compressed-tensors preset (FP8, FP8_DYNAMIC, FP8_BLOCK, W8A8, NVFP4, MXFP4,
    # W4A16, ...: secompress.quant.schemes): it sets the bits and group size; the method's backend makes it
    # (rtn: its integer codes for W4A16 / W8A16, the scheme backend for the others; gptq: W4A16 / W8A16)

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if self.se_bits == KEEP_16 and not isinstance(self.se_bits, bool):
            object.__setattr__(self, "se_bits", None)
        if self.se_bits not in (8, None) or isinstance(self.se_bits, bool):
            raise ValueError(f"se_bits must be 8 or 16 (keep 16-bit), got {self.se_bits!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.protect_super_experts, bool):
            raise ValueError("symmetric and protect_super_experts must be true or false")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError("rules must be Rule objects (Rule.parse('NAME=BITS') builds one)")
        for b in self.candidate_bits:
            if b != 16:
                check_bits(b, "candidate bits")
        if self.avg_bits is not None and (isinstance(self.avg_bits, bool) or
                                          not (isinstance(self.avg_bits, (int, float)) and self.avg_bits > 0)):
            raise ValueError(f"avg_bits must be a positive number, got {self.avg_bits!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.scheme is not None:
            self._set_scheme()
        backend = self.backend  # ValueError naming the known methods, or why the method cannot make the scheme
        if self.options is None:
            object.__setattr__(self, "options", backend.options())
        if type(self.options) is not backend.options:
            raise ValueError(f"method '{self.method}' takes options {backend.options.__name__}, "
                             f"got {type(self.options).__name__}")
        if self.calibration != "routed" and not backend.calibrated:
            raise ValueError(f"calibration '{self.calibration}' applies to calibrated methods; "
                             f"'{self.method}' uses no calibration data")
        backend.validate(self)
        fmt = resolve_format(backend, self.format)  # ValueError naming the formats of this method
        object.__setattr__(self, "format", fmt)
        if self.se_mode is None:
            object.__setattr__(self, "se_mode", FORMATS[fmt].default_se_mode if fmt in FORMATS else "expert")
        if self.se_mode not in SE_MODES:
            raise ValueError(f"se_mode must be one of {SE_MODES}, got '{self.se_mode}'")
        if fmt in FORMATS:
            FORMATS[fmt].check(self)  # e.g. compressed-tensors refuses se_mode 'expert'

    def _set_scheme(self) -> None:
        """The preset's name (upper case), bits and group size; ValueError naming the presets or the conflict."""
        from ..errors import SecompressError
        from .schemes import get_scheme

        if not isinstance(self.scheme, str):
            raise ValueError(f"scheme must be a preset name, got {self.scheme!r}")
        try:
            s = get_scheme(self.scheme)
        except SecompressError as e:
            raise ValueError(str(e)) from None
        mine = (s.weight_bits, s.group_size)
        if (self.bits, self.group_size) not in (mine, (DEFAULT_BITS, DEFAULT_GROUP_SIZE)):
            raise ValueError(f"scheme {s.name} sets bits {mine[0]} and group_size {mine[1]}; drop bits/group_size "
                             f"(got {self.bits} and {self.group_size})")
        for k, v in (("scheme", s.name), ("bits", mine[0]), ("group_size", mine[1])):
            object.__setattr__(self, k, v)

    def check_model(self, model, config=None) -> list[str]:
        """A scheme the model cannot serve (group or block sizes, vLLM's kernel rules) or that its checkpoint's
        own quantization makes meaningless (``config``: the checkpoint's, when ``model`` is a skeleton that
        lost it): SecompressError in one line, before any weight is read. Returns notes (slower kernels)."""
        if self.scheme is None:
            return []
        from .schemes import check_config, check_model, get_scheme

        s = get_scheme(self.scheme)
        check_config(s, config if config is not None else model.config)
        return check_model(s, model)

    def require(self) -> None:
        """MissingExtraError naming the extra the method or the export format needs (before any loading)."""
        self.backend.require()
        if self.format in FORMATS:
            FORMATS[self.format].require()

    @property
    def backend(self):
        """The method's backend, or the one it hands ``scheme`` to (:meth:`~.backends.base.Backend.for_scheme`)."""
        return backend_for(self.method, self.scheme)
