"""What a quantization backend is: one object per method, looked up by name in the registry.

A backend holds its own options dataclass (frozen, validated in ``__post_init__``), the
optional package it needs, and the steps every entry point (``quantize_``,
``save_quantized``, ``secompress.load``, the CLI and the recipe pipeline) calls by name:

    validate(config)            config-level checks, before any model is loaded
    check_plan(plan, config)    plan-level checks, before any weight changes
    layer_step(src, plan, config) -> step       the per-layer step of the one loop (:mod:`secompress.pipeline`):
                                                quantizes each decoder layer's part of the plan in place, on
                                                any layer source (in memory or streamed)
    apply(model, plan, config, ctx) -> plan     quantize ``model`` in place: ``layer_step`` over the model as a
                                                resident source (with the calibration stream if it needs one)
    save(model, tokenizer, plan, out, overwrite) -> out
    detect(path) / load(path, device) -> (model, plan | None)     for ``secompress.load``
    compatibility(plan) -> {runtime: (ok, why)}                   for the plan table and card
    load_snippet                                                  for the model card

A backend whose ``apply`` leaves secompress's integer-coded modules in the model
(``holds_codes``: rtn, gptq) can be written in any registered
:class:`~secompress.quant.formats.base.ExportFormat` that holds codes (``compressed-tensors``,
``dequantized``): ``QuantConfig.format`` picks one (None: the backend's ``default_format``), the plan
records it, and ``save_quantized`` / ``secompress.load`` / ``compatibility`` / ``load_snippet`` go to
the format instead of the backend. A backend's ``own_format`` is a registered format of its own
(bnb: ``bitsandbytes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...errors import MissingExtraError, require
from ..formats.base import ExportFormat, Exporter, installed, plan_export_format
from ..plan import QuantPlan


@dataclass(frozen=True)
class NoOptions:
    """A backend without options of its own."""


CALIB_Q = "calibration (quantized)"  # calibration windows through the already-quantized layers


def calibration_ids(ctx: "QuantContext"):
    """[N, S] calibration windows from ``ctx.data`` (CalibrationData as given, text tokenized now)."""
    from ...data import CalibrationData, load_calibration
    from ...profile import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN

    if isinstance(ctx.data, CalibrationData):
        return ctx.data.input_ids
    return load_calibration(ctx.data, ctx.tokenizer, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN).input_ids


@dataclass
class QuantContext:
    """What ``apply`` may need besides the model and the plan."""

    tokenizer: Any = None
    profile: Any = None  # a ProfileResult (resolved before apply when the backend needs one)
    data: Any = "builtin"  # calibration text or CalibrationData
    work: Path | None = None  # a scratch folder that outlives apply (checkpoint-based backends)
    source: Path | None = None  # the local checkpoint ``model`` was loaded from, untouched since (or None)


def layer_uniformity(plan: QuantPlan) -> tuple[bool, str]:
    """Whether every MoE layer's experts share one format (what fused-MoE kernels such as vLLM's need)."""
    from ..plan import bits_label

    mixed = {l: sorted({bits_label(plan.bits[n]) for n in names}, key=int) for l, names in plan.moe_layers().items()}
    mixed = {l: v for l, v in mixed.items() if len(v) > 1}
    if not mixed:
        return True, "every MoE layer's experts share one format"
    return False, ("mixed formats inside MoE layers " + ", ".join(f"{l}: {'/'.join(v)}" for l, v in
                                                                  sorted(mixed.items())) + " (use se_mode 'layer')")


class Backend(Exporter):
    name: ClassVar[str]
    options: ClassVar[type] = NoOptions
    package: ClassVar[str | None] = None  # the optional package it drives
    extra: ClassVar[str | None] = None  # its pip extra: pip install 'secompress[EXTRA]'
    import_package: ClassVar[bool] = True  # False: only check it is installed (a package that patches on import)
    calibrated: ClassVar[bool] = False  # uses calibration statistics: needs a profile for coverage
    covers_uncalibrated: ClassVar[bool] = False  # an expert no calibration token reached still gets its codes
    # and scales (the scheme backend: the layer's largest input scale, as vLLM serves fused experts): no coverage check
    # its step reads the calibration windows entering each layer through the layers quantized before it
    # (``inputs.hidden[CALIB_Q]``; GPTQ, static activation scales): the driver opens that stream
    propagated_calibration: ClassVar[bool] = False
    holds_codes: ClassVar[bool] = False  # apply leaves integer-coded modules: any ExportFormat can write them
    own_format: ClassVar[str | None] = None  # its own format: a registered one (bnb) or what save() writes (gptq)
    default_format: ClassVar[str | None] = None  # export format when the config names none (None: own save)

    def require(self) -> None:
        """MissingExtraError naming the extra when the package is not installed."""
        if self.package is None:
            return
        what = f"quantization method '{self.name}'"
        if self.import_package:
            require(self.package, self.extra or self.name, what)
        elif not installed(self.package):
            raise MissingExtraError(self.package, self.extra or self.name, what)

    def validate(self, config) -> None:
        """Config-level checks (ValueError); nothing is loaded yet."""

    def for_scheme(self, scheme) -> "Backend":
        """The backend that makes compressed-tensors scheme ``scheme`` (a
        :class:`~secompress.quant.schemes.Scheme`) with this method: itself, another one (rtn hands FP8 /
        NVFP4 / ... to the scheme backend), or ValueError naming why this method cannot."""
        raise ValueError(f"scheme {scheme.name} cannot be made with method '{self.name}'")

    def check_plan(self, plan: QuantPlan, config) -> None:
        """Plan-level checks (ValueError) before any weight changes."""

    def layer_step(self, src, plan: QuantPlan, config):
        """The per-layer step quantizing ``src``'s layers by ``plan`` (see the module docstring)."""
        raise NotImplementedError(f"quantization backend '{self.name}' defines no layer_step")

    def apply(self, model, plan: QuantPlan, config, ctx: QuantContext) -> QuantPlan:
        """``layer_step`` over ``model`` in memory; the calibration stream from ``ctx.data`` when needed."""
        from ...pipeline import Resident, Stream, run_pass

        src = Resident(model)
        streams = {}
        if self.propagated_calibration:
            ids = calibration_ids(ctx)
            streams[CALIB_Q] = Stream(list(ids.split(getattr(config.options, "batch_size", 8))))
        run_pass(src, streams, [self.layer_step(src, plan, config)], progress=False, desc=f"quantize ({self.name})")
        return plan


def check_group_sizes(plan: QuantPlan, group_size: int | None) -> None:
    """Every planned weight's input features split into whole groups (ValueError naming the weight)."""
    from .. import rtn

    for name, b in plan.bits.items():
        if b is not None:
            for n_in in plan.units[name].in_features:
                rtn.check_args(b, group_size, n_in, f"'{name}' (set its bits with a rule, or pick another group_size)")


__all__ = ["Backend", "ExportFormat", "Exporter", "NoOptions", "QuantContext", "check_group_sizes", "installed",
           "layer_uniformity", "plan_export_format"]
