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
(``holds_codes``: rtn, and gptq's codes read back) can be written in any registered
:class:`ExportFormat` (``dequantized``, ``compressed-tensors``): ``QuantConfig.format`` picks one
(None: the backend's ``default_format``), the plan records it, and ``save_quantized`` /
``secompress.load`` / ``compatibility`` / ``load_snippet`` go to the format instead of the backend.
A backend's own ``save`` is its ``own_format`` (gptq: ``gptqmodel``), or its only one (bnb).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ...errors import MissingExtraError, require
from ..plan import PLAN_NAME, QuantPlan


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


def installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def plan_export_format(path: Path) -> str | None:
    """``export.format`` of the quantization plan stored in ``path``, if any."""
    f = Path(path) / PLAN_NAME
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("export", {}).get("format")


def layer_uniformity(plan: QuantPlan) -> tuple[bool, str]:
    """Whether every MoE layer's experts share one format (what fused-MoE kernels such as vLLM's need)."""
    from ..plan import bits_label

    mixed = {l: sorted({bits_label(plan.bits[n]) for n in names}, key=int) for l, names in plan.moe_layers().items()}
    mixed = {l: v for l, v in mixed.items() if len(v) > 1}
    if not mixed:
        return True, "every MoE layer's experts share one format"
    return False, ("mixed formats inside MoE layers " + ", ".join(f"{l}: {'/'.join(v)}" for l, v in
                                                                  sorted(mixed.items())) + " (use se_mode 'layer')")


class Exporter:
    """What backends and export formats share: writing a checkpoint, recognising and loading it,
    the runtimes that serve it, and the model card's load snippet."""

    load_snippet: ClassVar[str] = ""  # model card code; PATH is replaced by the repo id or folder

    def save(self, model, tokenizer, plan: QuantPlan, out: str | Path, overwrite: bool = False) -> Path:
        raise NotImplementedError

    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds a checkpoint this backend or format wrote."""
        return False

    def load(self, path: str | Path, device: str | None = None):
        """(model, plan or None) of a checkpoint :meth:`detect` accepted."""
        raise NotImplementedError

    def compatibility(self, plan: QuantPlan) -> dict[str, tuple[bool, str]]:
        return {}


class Backend(Exporter):
    name: ClassVar[str]
    options: ClassVar[type] = NoOptions
    package: ClassVar[str | None] = None  # the optional package it drives
    extra: ClassVar[str | None] = None  # its pip extra: pip install 'secompress[EXTRA]'
    import_package: ClassVar[bool] = True  # False: only check it is installed (gptqmodel patches on import)
    calibrated: ClassVar[bool] = False  # uses calibration statistics: needs a profile for coverage
    # its step reads the calibration windows entering each layer through the layers quantized before it
    # (``inputs.hidden[CALIB_Q]``; GPTQ, static activation scales): the driver opens that stream
    propagated_calibration: ClassVar[bool] = False
    holds_codes: ClassVar[bool] = False  # apply leaves integer-coded modules: any ExportFormat can write them
    own_format: ClassVar[str | None] = None  # name of what its own save() writes, when formats are a choice
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


class ExportFormat(Exporter):
    """An export format of integer-coded models (``Backend.holds_codes``), registered in ``FORMATS``.

    ``check(config)`` refuses (ValueError) a config the format cannot hold, before anything is
    loaded; ``save`` / ``detect`` / ``load`` / ``compatibility`` / ``load_snippet`` as a backend's.
    """

    name: ClassVar[str]
    package: ClassVar[str | None] = None  # the optional package it writes with
    extra: ClassVar[str | None] = None
    default_se_mode: ClassVar[str] = "expert"  # se_mode when the config names none

    def require(self) -> None:
        if self.package is not None:
            require(self.package, self.extra or self.name, f"export format '{self.name}'")

    def check(self, config) -> None:
        """Config-level checks (ValueError); nothing is loaded yet."""


def check_group_sizes(plan: QuantPlan, group_size: int | None) -> None:
    """Every planned weight's input features split into whole groups (ValueError naming the weight)."""
    from .. import rtn

    for name, b in plan.bits.items():
        if b is not None:
            for n_in in plan.units[name].in_features:
                rtn.check_args(b, group_size, n_in, f"'{name}' (set its bits with a rule, or pick another group_size)")
