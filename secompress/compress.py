"""A compress job: prune and/or quantize and/or export a checkpoint in one pass over a layer source.

    job = Job(prune=PruneConfig(0.25), quant=QuantConfig(bits=4))
    plan = plan_job(source, job, profile, calib=ids)      # everything decided before any weight is read
    print(plan.describe())                                 # device, estimated peak memory, output size
    res = run_job(plan, Streamed(source), eval_ids, out="out/model", tokenizer=tok)   # or Resident(model)

The same steps run over a model in memory (:class:`~secompress.pipeline.Resident`) and over the
checkpoint's shards one decoder layer at a time (:class:`~secompress.pipeline.Streamed`); the results
are the same tensors. Up front, on the meta skeleton (no weight read): the prune method's plan (the
experts to remove when the profile decides them; the final expert count or width otherwise) and the
compressed model's shapes, the quantization plan, the export's config (refused here when a runtime
rule is broken), the size on disk and the peak memory. Then one pass per decoder layer: the
evaluation windows through the original layer (baseline perplexity, sink health), the method's step,
the backend's step, the windows through the compressed layer, the export writer. The Super-Expert
rule compares maxima across layers, so the profile is a pass of its own before this one.
Legend: N windows, S sequence length, H hidden size.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import as_saved, check_model, write_model_config
from .errors import SecompressError
from .outputs import atomic_dir, check_output_dir
from .pipeline import LayerSource, Stream, run_pass
from .shards import ShardWriter, TensorSpec, specs_of
from .streaming import Checkpoint

log = logging.getLogger(__name__)
GiB = 2**30
RUNTIME_BYTES = GiB // 2  # the Python, torch and transformers runtime itself


@dataclass(frozen=True)
class Job:
    prune: object | None = None  # PruneConfig
    quant: object | None = None  # QuantConfig
    batch_size: int = 8  # evaluation windows per chunk (as secompress.perplexity.mean_loss)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prune is not None and self.quant is not None and self.quant.avg_bits is not None \
                and self.prune.prune_method.needs_calibration and self.prune.prune_method.what == "experts":
            raise SecompressError(f"bit allocation (avg_bits) weighs each expert by its profile statistics, and "
                                  f"'{self.prune.method}' renumbers the experts during the pass: prune first, then "
                                  "quantize the output with avg_bits")

    @property
    def format(self) -> str | None:
        return None if self.quant is None else self.quant.format


@dataclass
class JobPlan:
    """Everything decided before any weight is read."""

    source: object  # secompress.source.Source
    job: Job
    model: object  # the compressed model's skeleton (meta, compute dtype)
    mplan: object | None  # the prune method's MethodPlan
    quant_plan: object | None
    out_specs: list[TensorSpec]
    code_specs: list[TensorSpec]
    code_shapes: dict[str, list]
    checkpoint_bytes: int
    layer_bytes: int  # the largest decoder layer in the compute dtype
    rest_bytes: int  # embeddings, final norm, output head
    profile: object | None = None
    ct: tuple | None = None  # (QuantizationConfig, compatibility) of a compressed-tensors export
    calib: torch.Tensor | None = None  # [N, S] calibration windows (the backend's propagated stream)
    export_bytes: int | None = None  # the export's size when the method estimates its own (bnb)
    late_ses: list = field(default_factory=list)  # original (layer, expert) SEs a merge renumbers in the pass

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def report(self) -> dict:
        """Which runtimes load the export, before it is written ({} without quantization)."""
        if self.quant_plan is None:
            return {}
        return self.quant_plan.compatibility()

    @property
    def output_bytes(self) -> int:
        """Size of the export: the 16-bit tensors and the codes file (dequantized format), or the 16-bit
        tensors less the quantized weights plus their packed codes, float32 scales and zero points."""
        if self.export_bytes is not None:
            return self.export_bytes
        plain = sum(s.nbytes for s in self.out_specs)
        codes = sum(s.nbytes for s in self.code_specs)
        if self.ct is None:
            return plain + codes
        el = torch.empty((), dtype=self.dtype, device="meta").element_size()
        dense = sum(math.prod(shape) for shape, _, _ in self.code_shapes.values()) * el
        scales = sum(s.nbytes for s in self.code_specs if s.name.endswith(".scales"))
        return plain - dense + codes + scales  # scales float16 -> float32

    def peak_bytes(self, num_windows: int = 0, seq_len: int = 0, streams: int = 2) -> int:
        """Estimated peak memory of a streamed pass: the embeddings and head, a layer materialised plus what
        quantization makes of it (codes, then the dequantized copy written out: about 2.5 layers at the
        worst moment), the streams' hidden states [N, S, H] in float32, one chunk's attention scores and the
        runtime; a method deciding from calibration windows: that stream [Nc, S, H] twice (what it carried
        into the layer too) and, for HEAPr's Fisher Hessian, every layer's calibration input kept."""
        H = int(getattr(self.source.config, "hidden_size", 0))
        heads = int(getattr(self.source.config, "num_attention_heads", 1))
        hidden = streams * num_windows * seq_len * H * 4
        attn = self.job.batch_size * heads * seq_len * seq_len * 4 * 2
        factor = 2.5 if self.job.quant is not None else 1.5
        return int(self.rest_bytes + factor * self.layer_bytes + hidden + attn + self._calib_bytes(H)
                   + RUNTIME_BYTES)

    def _calib_bytes(self, H: int) -> int:
        one = lambda ids: math.prod(ids.shape) * H * 4  # [Nc, S, H] float32
        total = 2 * one(self.calib) if self.calib is not None else 0
        m = self.mplan
        if m is None or m.calib is None:
            return total
        if getattr(m.config, "hessian", None) == "fisher" and m.config.prune_method.what == "width":
            kept = int(self.source.config.num_hidden_layers) - min(m.moe_layers)  # inputs of layers first..L-1
            return total + (2 + kept) * one(m.calib)  # + the dL/dh being propagated
        return total + 2 * one(m.calib)

    def describe(self, num_windows: int = 0, seq_len: int = 0, streamed: bool = True) -> str:
        where = "streamed layer by layer" if streamed else "in memory"
        return (f"plan: {where} on {self.source.device}; checkpoint {self.checkpoint_bytes / GiB:.2f} GiB, largest "
                f"layer {self.layer_bytes / GiB:.2f} GiB, embeddings+head {self.rest_bytes / GiB:.2f} GiB; "
                + (f"estimated peak memory {self.peak_bytes(num_windows, seq_len) / GiB:.2f} GiB; " if streamed else "")
                + f"output {self.output_bytes / GiB:.2f} GiB")


def _dtype_bytes(info: dict, dtype: torch.dtype) -> int:
    n = math.prod(info["shape"])
    floating = info["dtype"].startswith(("F", "BF"))
    return n * (torch.empty((), dtype=dtype, device="meta").element_size() if floating else 1)


def checkpoint_sizes(ckpt: Checkpoint, layers_path: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """From the safetensors headers: (bytes on disk, largest decoder layer, everything outside the layers,
    the whole model), the last three in ``dtype``."""
    disk = sum(f.stat().st_size for f in ckpt.path.glob("*.safetensors"))
    per_layer: dict[str, int] = {}
    rest = 0
    head = layers_path + "."
    for k, (_, _, info) in ckpt.where.items():
        b = _dtype_bytes(info, dtype)
        if k.startswith(head):
            idx = k[len(head):].split(".", 1)[0]
            per_layer[idx] = per_layer.get(idx, 0) + b
        else:
            rest += b
    return disk, max(per_layer.values(), default=0), rest, rest + sum(per_layer.values())


def code_specs(plan, group_size: int | None) -> tuple[list[TensorSpec], dict[str, list]]:
    """Names, dtypes and shapes of the packed codes file (as :func:`secompress.quant.api.quantized_tensors`)."""
    from .layout import PROJ
    from .quant import rtn

    specs, shapes = [], {}
    for name, b in plan.bits.items():
        if b is None:
            continue
        u = plan.units[name]
        if u.expert is None:
            mats = {name: (u.params // u.in_features[0], u.in_features[0])}  # [O, In]
        else:
            H, I = u.in_features  # gate/up read H, down reads I
            mats = {f"{name}.{p}": ((H, I) if p == "down_proj" else (I, H)) for p in PROJ}
        for key, (O, In) in mats.items():
            G = In // rtn.check_args(b, group_size, In, key)
            specs += [TensorSpec(f"{key}.qweight", torch.uint8, ((O * In * b + 7) // 8,)),
                      TensorSpec(f"{key}.scales", rtn.SCALE_DTYPE, (O, G)),
                      TensorSpec(f"{key}.zeros", torch.uint8, ((O * G * b + 7) // 8,))]
            shapes[key] = [[O, In], [O, G], b]
    return specs, shapes


class _Kept:  # what remap_profile reads
    def __init__(self, kept: dict[int, list[int]]):
        self.kept, self.num_experts_after = kept, len(next(iter(kept.values())))


def plan_job(source, job: Job, profile=None, protect: bool | None = None, calib: torch.Tensor | None = None) -> JobPlan:
    """Decide everything on the meta skeleton (no weights read); raises before any compute.

    ``protect`` overrides both configs' ``protect_super_experts`` (False: the SE-unaware variant);
    ``calib`` [N, S]: the calibration windows methods and backends decide from."""
    from .prune.result import remap_profile

    model = source.skeleton()  # pruning changes this skeleton's config
    for mod in model.modules():  # the compute dtype: what materialising gives the parameters
        for n, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point():
                mod._parameters[n] = torch.nn.Parameter(torch.empty_like(p, dtype=source.dtype, device="meta"),
                                                        requires_grad=False)
    adapter = check_model(model)
    disk, layer_b, rest_b, _ = checkpoint_sizes(source.checkpoint, adapter.layers_path, source.dtype)
    mplan = qplan = None
    prof, late = profile, []
    if job.prune is not None:
        pcfg = job.prune if protect is None else dataclasses.replace(job.prune, protect_super_experts=protect)
        method = pcfg.prune_method
        if profile is None:
            raise SecompressError(f"pruning with '{pcfg.method}' needs the profile (Super Experts, statistics): "
                                  "profile first")
        mplan = method.plan(model, pcfg, profile, calib if method.needs_calibration else None)
        if mplan.kept is not None:
            prof = remap_profile(profile, _Kept(mplan.kept))
        elif method.what == "experts":  # merged / chosen in the pass: the SEs' new ids are not known yet
            late = [(l, e) for l, e in profile.se_ids() if e != "shared"]
            K = adapter.num_experts(model.config)
            prof = remap_profile(profile, _Kept({l: list(range(K)) for l in mplan.moe_layers}))
    if job.quant is not None:
        from .quant.apply import plan_quantization

        qcfg = job.quant if protect is None else dataclasses.replace(job.quant, protect_super_experts=protect)
        ses = None
        if late:
            ses = [(l, None) for l in sorted({l for l, _ in late})] + [(l, e) for l, e in profile.se_ids()
                                                                       if e == "shared"]
        qplan = plan_quantization(model, qcfg, profile=prof, ses=ses)
    sd = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
    out_specs = specs_of(as_saved(model, sd))
    cspecs, cshapes, export_bytes, ct = [], {}, None, None
    if qplan is not None:
        export_bytes, cspecs, cshapes, ct = _export_plan(model, qplan, job.quant, source.dtype,
                                                         sum(s.nbytes for s in out_specs))
        if ct is not None:
            qplan.artifacts["compatibility"] = ct[1]  # derived from the export's config
    needs_calib = job.quant is not None and job.quant.backend.propagated_calibration
    if needs_calib and (calib is None or len(calib) == 0):
        raise SecompressError(f"quantization method '{job.quant.method}' calibrates on windows entering each layer: "
                              "pass the calibration windows (calib=ids [N, S])")
    return JobPlan(source, job, model, mplan, qplan, out_specs, cspecs, cshapes, disk, layer_b, rest_b, profile, ct,
                   calib=calib if needs_calib else None, export_bytes=export_bytes, late_ses=late)


def _export_plan(model, qplan, qcfg, dtype, plain_bytes: int):
    """(own size estimate or None, codes specs, codes shapes, compressed-tensors (config, report) or None);
    ``plain_bytes``: every tensor of the compressed model in ``dtype``."""
    fmt = qcfg.format
    if _bnb(Job(quant=qcfg)):  # bitsandbytes: its own format, its own estimate
        from .quant.bnb_stream import bnb_bytes

        return bnb_bytes(model, qplan, dtype), [], {}, None
    if not qcfg.backend.holds_codes:  # the backend leaves plain weights: a plain export
        return None, [], {}, None
    cspecs, cshapes = code_specs(qplan, qcfg.group_size)
    ct = None
    if fmt == "compressed-tensors":
        from .errors import require
        from .quant.ct_stream import ct_config

        require("compressed_tensors", "ct", "the compressed-tensors export")
        ct = ct_config(model, qplan)  # refuses (se_mode expert, a config vLLM rejects) before any compute
        from .quant.scheme_export import estimate_bytes, plan_scheme

        if plan_scheme(qplan) is not None:  # FP8, NVFP4, ...: codes and scales of the scheme, not RTN's
            return estimate_bytes(qplan, check_model(model), dtype, plain_bytes), [], {}, ct
    return None, cspecs, cshapes, ct


# ---- export writers (one per format; see secompress.quant.backends) -------------------------------
class ExportLayers:
    """Write the layer's tensors (dequantized where quantized) as save_pretrained names them, and its codes."""

    def __init__(self, src: LayerSource, writer: ShardWriter, codes: ShardWriter | None, plan):
        self.src, self.writer, self.codes, self.plan = src, writer, codes, plan

    def write_rest(self) -> None:
        head = self.src.adapter.layers_path + "."
        sd = {k: v for k, v in self.src.model.state_dict().items() if not k.startswith(head)}
        for k, v in as_saved(self.src.model, sd).items():
            self.writer.write(k, v)

    def on_layer(self, index: int, layer, inputs) -> None:
        from .quant.api import dequantized, quantized_tensors

        prefix = self.src.layer_prefix(index)
        with dequantized(self.src.model):
            sd = {prefix + k: v for k, v in self.src.layers[index].state_dict().items()}
            for k, v in as_saved(self.src.model, sd).items():
                self.writer.write(k, v)
            del sd
        if self.codes is not None and self.plan is not None:
            tensors, _ = quantized_tensors(self.src.model, self.plan.layer(index))
            for k, v in tensors.items():
                self.codes.write(k, v)


class ExportLayersCT:
    """Write each layer in compressed-tensors format as it finishes (:mod:`secompress.quant.ct_stream`)."""

    def __init__(self, src: LayerSource, writer, plan, qc, symmetric: bool):
        self.src, self.writer, self.plan, self.qc, self.symmetric = src, writer, plan, qc, symmetric

    def write_rest(self) -> None:
        from .quant.ct_stream import rest_tensors

        self.writer.write_part(rest_tensors(self.src.model, self.src.adapter))

    def on_layer(self, index: int, layer, inputs) -> None:
        from .quant.ct_stream import layer_tensors

        self.writer.write_part(layer_tensors(self.src.model, self.src.adapter, index, self.plan.layer(index),
                                             self.qc, self.symmetric))


# ---- the pass -----------------------------------------------------------------------------------------
@dataclass
class JobResult:
    plan: JobPlan
    loss_before: float | None = None
    loss_after: float | None = None
    out: Path | None = None
    seconds: float = 0.0
    prune_step: object | None = None  # the prune method's step (its decisions, for the report)
    sink_before: object | None = None  # SinkHealth of the original model (``sink=True``, baseline stream)
    sink_after: object | None = None  # SinkHealth of the compressed model (``sink=True``)

    @property
    def perplexity_before(self) -> float | None:
        return None if self.loss_before is None else math.exp(self.loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return None if self.loss_after is None else math.exp(self.loss_after)

    def prune_result(self, profile, data_source: str, model_name: str = "", **kw):
        """The prune report of this pass (None without a prune stage)."""
        m = self.plan.mplan
        if m is None:
            return None
        r = m.config.prune_method.result(m, self.prune_step, profile, data_source,
                                         (self.perplexity_before, self.perplexity_after), self.seconds,
                                         model_name=model_name, **kw)
        return r


def check_disk(out: Path, need: int) -> None:
    """Refuse (before any compute) when the output's file system lacks ``need`` bytes (+ 1% margin)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need * 1.01:
        raise SecompressError(f"the export needs {need / GiB:.2f} GiB but '{parent}' has {free / GiB:.2f} GiB free; "
                              "free space or write elsewhere")


class _BindLateSEs:
    """Before the quantization step of a layer a merge just decided: the plan protects that layer's Super
    Experts under their new ids (the plan was built knowing only their layer)."""

    def __init__(self, plan: JobPlan, prune_step):
        self.plan, self.prune_step = plan, prune_step

    def on_layer(self, index: int, layer, inputs) -> None:
        kept = getattr(self.prune_step, "kept", None) or {l: d.representatives for l, d in
                                                           getattr(self.prune_step, "decisions", {}).items()}
        if index not in kept:
            return
        qp = self.plan.quant_plan
        new = [(index, kept[index].index(e)) for l, e in self.plan.late_ses if l == index and e in kept[index]]
        qp.super_experts = [s for s in qp.super_experts if not (s[0] == index and s[1] is None)] + new


def run_job(plan: JobPlan, src: LayerSource, eval_ids: torch.Tensor | None = None, out: str | Path | None = None,
            tokenizer=None, baseline: bool = True, overwrite: bool = False, progress: bool = True,
            finish=None, sink: bool = False, extra_steps=()) -> JobResult:
    """One pass of ``plan`` over ``src``: baseline and compressed perplexity over ``eval_ids`` [N, S] (when
    given) and the export into ``out`` (when given; atomic, with the tokenizer, config, plan, codes and the
    files ``finish(result, folder)`` writes into the export's folder once the perplexities are known, before it
    is renamed into place). ``sink``: also the
    baseline and compressed :class:`~secompress.sink.SinkHealth` over ``eval_ids``. ``extra_steps``: more
    per-layer steps, run after the job's own (a diagnostic, a test's fault injection)."""
    t0 = time.perf_counter()
    job = plan.job
    if out is not None:
        out = check_output_dir(out, overwrite)
        check_disk(out, plan.output_bytes)
    steps = []
    res = JobResult(plan)
    if plan.mplan is not None:
        res.prune_step = plan.mplan.config.prune_method.step(src, plan.mplan, progress)
        steps.append(res.prune_step)
        if plan.late_ses and plan.quant_plan is not None:
            steps.append(_BindLateSEs(plan, res.prune_step))
    streams = {}
    if plan.quant_plan is not None:
        backend = job.quant.backend
        steps.append(backend.layer_step(src, plan.quant_plan, job.quant))
        if backend.propagated_calibration:
            from .quant.backends.base import CALIB_Q

            streams[CALIB_Q] = Stream(list(plan.calib.split(job.batch_size)))
    steps.extend(extra_steps)
    chunks = list(eval_ids.split(job.batch_size)) if eval_ids is not None else []
    meters = {}
    if sink and chunks:
        from .sink_meter import SinkMeter

        meters = {n: SinkMeter(len(src.layers)) for n in (("before", "after") if baseline else ("after",))}
    if chunks:
        if baseline:
            streams["before"] = Stream(chunks, before=True, watch=meters["before"].watch if meters else None)
        streams["after"] = Stream(chunks, watch=meters["after"].watch if meters else None)
    log.info("%s", plan.describe(*(eval_ids.shape if eval_ids is not None else (0, 0)), streamed=not src.resident))

    def one_pass(folder: Path | None):
        writer = codes = None
        if folder is not None:
            src.load_rest()
            writer, codes, exporter = _exporter(plan, src, folder)
            exporter.write_rest()
            steps.append(exporter)
        final = run_pass(src, streams, steps, progress=progress, desc="compress")
        if "before" in final:
            res.loss_before = src.mean_loss(final.pop("before"), chunks)
        if "after" in final:
            res.loss_after = src.mean_loss(final.pop("after"), chunks)
        if "before" in meters:
            res.sink_before = meters["before"].health()
        if "after" in meters:
            res.sink_after = meters["after"].health()
        res.seconds = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            if codes is not None:
                codes.close()
            _write_side_files(plan, folder, tokenizer)
            if finish is not None:
                finish(res, folder)

    if out is None:
        one_pass(None)
    else:
        with atomic_dir(out, overwrite) as tmp:
            one_pass(tmp)
        res.out = out
    res.seconds = time.perf_counter() - t0
    return res


def _bnb(job: Job) -> bool:
    from .quant.backends.bnb import BnbBackend

    return job.quant is not None and isinstance(job.quant.backend, BnbBackend)


def _exporter(plan: JobPlan, src: LayerSource, folder: Path):
    """(writer to close, codes writer or None, the per-layer export step) of the plan's export format."""
    job = plan.job
    if _bnb(job):  # interim: the export formats' own writers replace this dispatch
        from .quant.bnb_stream import ExportLayersBnb

        exporter = ExportLayersBnb(src, folder, plan.quant_plan)
        return exporter.writer, None, exporter
    if plan.ct is not None:
        from .shards import PartWriter

        writer = PartWriter(folder)
        return writer, None, ExportLayersCT(src, writer, plan.quant_plan, plan.ct[0], bool(job.quant.symmetric))
    writer, codes = ShardWriter(folder, plan.out_specs), None
    if plan.code_specs:
        from .quant.api import CODES_NAME

        codes = ShardWriter(folder, plan.code_specs, stem=CODES_NAME.removesuffix(".safetensors"),
                            max_shard_bytes=1 << 62, metadata={"format": "secompress-rtn", "version": "1",
                                                               "shapes": json.dumps(plan.code_shapes)})
    return writer, codes, ExportLayers(src, writer, codes, plan.quant_plan)


def _write_side_files(plan: JobPlan, folder: Path, tokenizer) -> None:
    from .quant.api import PLAN_NAME

    model = plan.model
    model.config.dtype = plan.dtype  # the weights are written in the compute dtype
    job = plan.job
    if _bnb(job):
        from .quant.bnb_stream import finish_bnb

        from types import SimpleNamespace

        finish_bnb(folder, model, plan.quant_plan, SimpleNamespace(quant=job.quant, dtype=plan.dtype), tokenizer)
    elif plan.ct is not None:
        from .quant.ct_stream import finish_ct

        finish_ct(folder, model, plan.ct[0], plan.quant_plan, plan.ct[1], plan.dtype, tokenizer)
    else:
        write_model_config(model, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if plan.quant_plan is not None:
            (folder / PLAN_NAME).write_text(json.dumps(plan.quant_plan.to_json(), indent=2) + "\n")
