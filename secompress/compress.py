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
the backend's step, the windows through the compressed layer, the export format's writer
(:mod:`secompress.quant.formats`: 16-bit tensors in the checkpoint's own 16-bit dtype, whatever the
compute dtype). The Super-Expert rule compares maxima across layers, so the profile is a pass of its
own before this one.
Legend: N windows, S sequence length, H hidden size.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import as_saved, check_model
from .errors import SecompressError
from .outputs import atomic_dir, check_output_dir
from .pipeline import LayerSource, Stream, run_pass
from .quant.formats import FORMATS
from .quant.formats.base import export_dtype as own_export_dtype
from .shards import TensorSpec, specs_of
from .streaming import Checkpoint

log = logging.getLogger(__name__)
GiB = 2**30
RUNTIME_BYTES = GiB // 2  # the Python, torch and transformers runtime itself
PLAIN = "plain"  # the export format of an unquantized (pruned, merged, untouched) model


@dataclass(frozen=True)
class Job:
    prune: object | None = None  # PruneConfig
    quant: object | None = None  # QuantConfig
    batch_size: int = 8  # evaluation windows per chunk (as secompress.perplexity.mean_loss)
    export_dtype: torch.dtype | None = None  # 16-bit tensors on disk; None: the checkpoint's own 16-bit dtype

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prune is not None and self.quant is not None and self.quant.avg_bits is not None \
                and self.prune.prune_method.needs_calibration and self.prune.prune_method.what == "experts":
            raise SecompressError(f"bit allocation (avg_bits) weighs each expert by its profile statistics, and "
                                  f"'{self.prune.method}' renumbers the experts during the pass: prune first, then "
                                  "quantize the output with avg_bits")

    @property
    def format(self) -> str:
        """The export format's name: the quantization's (QuantConfig.format), ``plain`` without one or for a
        backend whose step leaves plain weights (no integer codes, no registered format of its own: its
        ``save`` is a plain checkpoint plus its plan, which the plain writer writes per layer)."""
        if self.quant is None:
            return PLAIN
        fmt, backend = self.quant.format, self.quant.backend
        if fmt is None and not backend.holds_codes and backend.own_format is None:
            return PLAIN
        if fmt not in FORMATS:  # a backend's own whole-model save: not a per-layer writer
            raise SecompressError(f"format '{fmt}' (method '{self.quant.method}''s own save) is written by "
                                  f"save_quantized only; a compress job writes the export formats "
                                  f"({', '.join(FORMATS)}; --format, stages.export.format)")
        return fmt


@dataclass
class JobPlan:
    """Everything decided before any weight is read."""

    source: object  # secompress.source.Source
    job: Job
    model: object  # the compressed model's skeleton (meta, compute dtype)
    mplan: object | None  # the prune method's MethodPlan
    quant_plan: object | None
    out_specs: list[TensorSpec]  # the compressed model's tensors as saved, in the compute dtype
    checkpoint_bytes: int
    layer_bytes: int  # the largest decoder layer in the compute dtype
    rest_bytes: int  # embeddings, final norm, output head
    profile: object | None = None
    calib: torch.Tensor | None = None  # [N, S] calibration windows (the backend's propagated stream)
    late_ses: list = field(default_factory=list)  # original (layer, expert) SEs a merge renumbers in the pass
    export_dtype: torch.dtype = torch.bfloat16  # 16-bit tensors on disk (the checkpoint's own, or job.export_dtype)
    as_stored: bool = True  # plain export of a block-scaled FP8 source: copy its FP8 tensors as stored

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
        """Size of the export's tensor files (the export format's estimate, from the meta skeleton)."""
        return FORMATS[self.job.format].estimate_bytes(self.model, self.quant_plan, self.export_dtype,
                                                       self.source.path if self.as_stored else None)

    def writer(self, folder: Path, tokenizer=None):
        """The export format's per-layer writer into ``folder`` (:mod:`secompress.quant.formats`)."""
        fmt = FORMATS[self.job.format]
        kept = getattr(self.mplan, "kept", None)  # plain: which source experts the kept ones are (FP8 as stored)
        opts = {"kept": kept, "as_stored": self.as_stored} if fmt.holds == "unquantized" else {}
        return fmt.writer(folder, self.model, self.quant_plan, self.export_dtype, tokenizer, source=self.source.path,
                          source_size=self.checkpoint_bytes, **opts)

    def peak_bytes(self, num_windows: int = 0, seq_len: int = 0, streams: int = 2) -> int:
        """Estimated peak memory of a streamed pass: the embeddings and head, a layer materialised plus what
        quantization makes of it (codes, then the dequantized copy written out: about 2.5 layers at the
        worst moment), the next layer read meanwhile (:class:`~secompress.pipeline.prefetch.Prefetcher`),
        the streams' hidden states [N, S, H] in float32, one chunk's attention scores and the runtime; a method deciding from calibration windows: that stream [Nc, S, H] twice (what it carried
        into the layer too) and, for HEAPr's Fisher Hessian, every layer's calibration input kept."""
        H = int(getattr(self.source.config, "hidden_size", 0))
        heads = int(getattr(self.source.config, "num_attention_heads", 1))
        hidden = streams * num_windows * seq_len * H * 4
        attn = self.job.batch_size * heads * seq_len * seq_len * 4 * 2
        factor = (2.5 if self.job.quant is not None else 1.5) + 1.0  # + the layer read ahead
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
    for k, info in ckpt.tensor_infos().items():  # compressed-tensors weights as the dequantized tensors they become
        b = _dtype_bytes(info, dtype)
        if k.startswith(head):
            idx = k[len(head):].split(".", 1)[0]
            per_layer[idx] = per_layer.get(idx, 0) + b
        else:
            rest += b
    return disk, max(per_layer.values(), default=0), rest, rest + sum(per_layer.values())


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
    fmt = FORMATS[job.format]
    fmt.require()
    if qplan is not None:
        # refuses what it cannot write (a config vLLM rejects), before any compute; the report known up front
        qplan.artifacts["compatibility"] = fmt.preview(model, qplan)
    needs_calib = job.quant is not None and job.quant.backend.propagated_calibration
    if needs_calib and (calib is None or len(calib) == 0):
        raise SecompressError(f"quantization method '{job.quant.method}' calibrates on windows entering each layer: "
                              "pass the calibration windows (calib=ids [N, S])")
    changes = mplan is not None and getattr(mplan.config.prune_method, "changes_weights", False)
    return JobPlan(source, job, model, mplan, qplan, out_specs, disk, layer_b, rest_b, profile,
                   calib=calib if needs_calib else None, late_ses=late,
                   export_dtype=job.export_dtype or own_export_dtype(source.config, source.dtype),
                   as_stored=not changes and job.quant is None)


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
    export: object | None = None  # the writer's ExportSummary (bytes, files, ratio to the checkpoint)

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

            # chunked as the in-memory apply chunks them (the backend's batch_size): the same float sums
            streams[CALIB_Q] = Stream(list(plan.calib.split(getattr(job.quant.options, "batch_size", job.batch_size))))
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
        writer = None
        if folder is not None:  # the export format's writer: the last per-layer step
            src.load_rest()
            writer = plan.writer(folder, tokenizer)
            writer.write_rest(src.model)
            steps.append(writer)
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
            res.export = writer.finish()
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
