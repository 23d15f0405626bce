"""What an export format is: one per-layer writer, the same for a model in memory and a streamed one.

    fmt = FORMATS["compressed-tensors"]
    fmt.estimate_bytes(skeleton, plan, dtype)                  # before any weight is read (disk check, plan)
    w = fmt.writer(folder, skeleton, plan, dtype, tokenizer)   # refuses what it cannot write, writes nothing yet
    w.write_rest(model)                                        # embeddings, final norm, head (a tied head once)
    for i, layer in enumerate(layers): w.on_layer(i, layer, None)   # the engine's callback protocol
    summary = w.finish()                                       # config.json, quantization config, index, plan,
                                                               # tokenizer; an ExportSummary (bytes, ratio)

``skeleton`` is the compressed model's module tree (the model itself in memory, its ``meta``
skeleton when streamed: configs, names and sizes come from it); ``model`` is the live model whose
layers ``on_layer`` reads after the earlier steps compressed them (in memory: the same model).
``dtype`` is the dtype 16-bit tensors are written in (:func:`export_dtype`: the source
checkpoint's own 16-bit dtype, whatever dtype the computation ran in). :meth:`ExportFormat.save`
is the writer run over a resident model; the streamed engine calls the same writer layer by layer
(:mod:`secompress.streamed`). Every file written is readable by others (:func:`publish`).

An exporter (a format, or a backend's own ``save``) also recognises and loads what it wrote
(``detect`` / ``load``), tells which runtimes serve it (``compatibility``; ``preview`` before it is
written) and gives the model card's ``load_snippet``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ...checkpoints import check_model
from ...errors import require
from ...streaming import disk_key
from ..plan import PLAN_NAME, QuantPlan

log = logging.getLogger(__name__)
MiB = 2**20
HOLDS = ("codes", "own", "unquantized")  # what an ExportFormat writes (see ExportFormat.holds)
HEADER_BYTES = 112  # about what one tensor's entry adds to a safetensors header (estimates)
SCALE_DTYPES = ("model", "float32")  # QuantConfig.scale_dtype: scales in the export dtype, or float32 (exact)


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


# ---- what an export wrote ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSummary:
    """The tensor files an export wrote (what a runtime reads; integer codes included) and their size
    against the source checkpoint's safetensors files (None: the source is not a local folder)."""

    format: str
    bytes: int
    files: tuple[str, ...]
    source_bytes: int | None = None

    @property
    def ratio(self) -> float | None:
        return None if not self.source_bytes else self.bytes / self.source_bytes

    def to_json(self) -> dict:
        return {"format": self.format, "bytes": self.bytes, "files": list(self.files),
                "source_bytes": self.source_bytes, "ratio": None if self.ratio is None else round(self.ratio, 4)}

    def describe(self) -> str:
        n = len(self.files)
        what = f"{self.format} export: {self.bytes / MiB:.1f} MiB in {n} tensor file{'s' if n != 1 else ''}"
        if self.ratio is None:
            return what
        return f"{what}, {self.ratio:.2f}x the source's {self.source_bytes / MiB:.1f} MiB"


def source_bytes(source: str | Path | None) -> int | None:
    """Bytes of the safetensors files of a local checkpoint folder (None otherwise)."""
    if source is None or not Path(source).is_dir():
        return None
    files = list(Path(source).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def export_dtype(source_config, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype 16-bit tensors are written in: the source checkpoint's own 16-bit dtype (bfloat16 for a
    block-scaled FP8 one), whatever dtype the computation ran in; the compute dtype when the source has
    no 16-bit dtype (a float32 checkpoint, or none known)."""
    from ...checkpoints import resolve_dtype

    own = resolve_dtype("auto", source_config) if source_config is not None else None
    return own if own in (torch.bfloat16, torch.float16) else compute_dtype


def resident_source(model) -> Path | None:
    """The local checkpoint folder ``model`` was loaded from (``name_or_path``), or None."""
    p = getattr(model, "name_or_path", None)
    return Path(p) if p and Path(p).is_dir() and (Path(p) / "config.json").is_file() else None


def resident_dtype(model, source: Path | None) -> torch.dtype:
    """:func:`export_dtype` of a model in memory (its compute dtype: its input embeddings')."""
    from ...checkpoints import load_config

    cfg = None
    if source is not None:
        try:
            cfg = load_config(source)
        except Exception as e:  # an unreadable source config: the model's own dtype, said once
            log.warning("could not read the source config of '%s' (%s): writing in the model's dtype", source, e)
    return export_dtype(cfg, model.get_input_embeddings().weight.dtype)


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype, keep=()) -> dict[str, torch.Tensor]:
    """Floating tensors (16/32-bit) in ``dtype``, except the keys in ``keep`` (quantization data)."""
    wide = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return {k: v.to(dtype) if v.dtype in wide and v.dtype != dtype and k not in keep else v
            for k, v in tensors.items()}


def publish(folder: Path) -> None:
    """Every file under ``folder`` readable by others (safetensors writes 0600): files 0666, folders 0777,
    less the process umask, as any ordinary file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def write_plan(folder: Path, plan: QuantPlan, export: dict) -> None:
    """``quantization_plan.json``: the plan with the export's record (format, dtype, size, ...)."""
    d = plan.to_json()
    d["export"] = export
    (Path(folder) / PLAN_NAME).write_text(json.dumps(d, indent=2) + "\n")


# ---- the writer --------------------------------------------------------------------------------
@torch.no_grad()
def rest_tensors(model, adapter) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (embeddings, final norm, output head), a tied head once."""
    head = adapter.layers_path + "."
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(head) or v.device.type == "meta":
            continue
        if v.is_floating_point() and v.numel() and (v.data_ptr(), v.shape) in seen:
            continue  # tied to a tensor already stored (tie_weights restores it on load)
        seen.add((v.data_ptr(), v.shape))
        out[disk_key(adapter, k)] = v.detach().to("cpu").contiguous()
    return out


class LayerWriter:
    """One export written layer by layer (see the module docstring). A format subclasses it with
    ``rest_tensors(model)`` and ``layer_tensors(index, layer)`` ({checkpoint key: tensor}, written to
    safetensors files as they come, :class:`~secompress.shards.PartWriter`) and ``write_config(summary)``
    (config.json, quantization config, plan); :meth:`finish` closes the files, writes the tokenizer and
    makes everything readable. ``self.model`` is the live model (bound by :meth:`write_rest`)."""

    format: str = ""
    always_index = False  # write model.safetensors.index.json even for one file

    def __init__(self, folder: str | Path, skeleton, plan: QuantPlan | None, dtype: torch.dtype, tokenizer=None,
                 source: str | Path | None = None, source_size: int | None = None):
        from ...shards import PartWriter

        self.folder, self.skeleton, self.plan, self.dtype, self.tokenizer = Path(folder), skeleton, plan, dtype, \
            tokenizer
        self.source = Path(source) if source is not None else None
        self.source_size = source_size if source_size is not None else source_bytes(self.source)
        self.adapter = check_model(skeleton)
        self.model = None
        self.files = PartWriter(self.folder, always_index=self.always_index)
        self.summary: ExportSummary | None = None

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def write_rest(self, model) -> None:
        """Everything outside the decoder layers; binds the live ``model`` the layers are read from."""
        self.model = model
        self.files.write_part(self.rest_tensors(model))

    def on_layer(self, index: int, layer, inputs=None) -> None:
        """Write decoder layer ``index`` as the earlier steps left it (``inputs`` is not used)."""
        if self.model is None:
            raise RuntimeError("LayerWriter.write_rest(model) must come before on_layer")
        self.files.write_part(self.layer_tensors(index, layer))

    def finish(self) -> ExportSummary:
        """Close the tensor files, write config, plan and tokenizer; the :class:`ExportSummary`."""
        written = [p for p in self.files.close() if p.suffix == ".safetensors"] + self.extra_tensor_files()
        self.summary = ExportSummary(self.format, sum(p.stat().st_size for p in written),
                                     tuple(str(p.relative_to(self.folder)) for p in written), self.source_size)
        self.write_config(self.summary)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.folder)
        publish(self.folder)
        log.info("%s", self.summary.describe())
        return self.summary

    # ---- what a format fills in ----
    def rest_tensors(self, model) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer_tensors(self, index: int, layer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def write_config(self, summary: ExportSummary) -> None:
        raise NotImplementedError

    def extra_tensor_files(self) -> list[Path]:
        """Tensor files written besides the model's shards (closed here), e.g. a codes file."""
        return []


# ---- exporters ---------------------------------------------------------------------------------
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

    def preview(self, skeleton, plan: QuantPlan) -> dict[str, tuple[bool, str]]:
        """The compatibility report before anything is written (refusing what cannot be written)."""
        return self.compatibility(plan)


class ExportFormat(Exporter):
    """An export format, registered in ``FORMATS`` (:mod:`secompress.quant.formats`).

    ``holds`` says what it writes: ``codes`` (secompress's integer-coded modules: any backend with
    ``holds_codes``), ``own`` (only the backend whose ``own_format`` it is, e.g. bitsandbytes) or
    ``unquantized`` (pruned, merged or untouched models: ``plain``). ``check(config)`` refuses
    (ValueError) a QuantConfig it cannot hold, before anything is loaded.
    """

    name: ClassVar[str]
    holds: ClassVar[str] = "codes"
    package: ClassVar[str | None] = None  # the optional package it writes with
    extra: ClassVar[str | None] = None
    default_se_mode: ClassVar[str] = "expert"  # se_mode when the config names none
    writer_class: ClassVar[type[LayerWriter]]

    def require(self) -> None:
        if self.package is not None:
            require(self.package, self.extra or self.name, f"export format '{self.name}'")

    def check(self, config) -> None:
        """Config-level checks (ValueError); nothing is loaded yet."""

    def estimate_bytes(self, skeleton, plan: QuantPlan | None, dtype: torch.dtype, source=None) -> int:
        """Bytes of the tensor files, from the (meta) skeleton and the plan (no weight read)."""
        raise NotImplementedError

    def writer(self, folder: str | Path, skeleton, plan: QuantPlan | None, dtype: torch.dtype, tokenizer=None,
               source: str | Path | None = None, source_size: int | None = None, **options) -> LayerWriter:
        """A :class:`LayerWriter` into ``folder`` (which exists); refuses what it cannot write first."""
        self.require()
        return self.writer_class(folder, skeleton, plan, dtype, tokenizer, source, source_size, **options)

    def save(self, model, tokenizer, plan: QuantPlan | None, out: str | Path, overwrite: bool = False,
             dtype: torch.dtype | None = None, source: str | Path | None = None, **options) -> Path:
        """The writer over a resident ``model``, atomically into ``out``; ``dtype`` None: :func:`resident_dtype`,
        ``source`` None: the folder the model was loaded from. The summary is ``plan.artifacts['export']``."""
        from ...outputs import atomic_dir

        self.require()
        source = Path(source) if source is not None else resident_source(model)
        dtype = dtype or resident_dtype(model, source)
        with atomic_dir(out, overwrite) as tmp:
            summary = write_resident(self, model, tokenizer, plan, tmp, dtype, source, **options)
        if plan is not None:
            plan.artifacts["export"] = summary
        return Path(out)


def write_resident(fmt: ExportFormat, model, tokenizer, plan, folder: Path, dtype: torch.dtype, source=None,
                   **options) -> ExportSummary:
    """``fmt``'s writer over a model in memory into the existing ``folder`` (no forward is needed)."""
    w = fmt.writer(folder, model, plan, dtype, tokenizer, source, **options)
    w.write_rest(model)
    for i, layer in enumerate(check_model(model).layers(model)):
        w.on_layer(i, layer, None)
    return w.finish()
