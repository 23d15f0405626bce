"""GPTQ in the layer-by-layer engine: gptqmodel quantizes a checkpoint, the engine reads its codes per layer.

    plan = plan_streamed("ckpt/", StreamedJob(prune=pc, quant=QuantConfig(method="gptq")), profile, calib=ids)
    res = compress_streamed(plan, eval_ids, out="out/model", tokenizer=tok)   # -> compress_gptq

Up to three steps; this process never holds more than the engine's one layer:
1. when pruning, a streamed pass removes the planned experts and writes the pruned checkpoint (plain,
   in the compute dtype) into a work folder, measuring the baseline perplexity on the way;
2. gptqmodel quantizes that checkpoint (the source itself when not pruning) in a child process,
   with the plan's overrides (:func:`~secompress.quant.gptq.gptq_quantize`). The child loads its
   own copy of the model: that memory is the child's, not this process's, and is returned when it
   exits;
3. a streamed pass over the same checkpoint reads each layer's GPTQ codes into integer-coded modules
   (:func:`~secompress.quant.gptq_codes.load_gptq_codes` with the layer's part of the plan), runs the
   evaluation windows through it (compressed perplexity; baseline too when not pruning) and writes
   the layer in the chosen export format (compressed-tensors or dequantized).
The work folder (pruned checkpoint, gptqmodel's output) sits next to the output (in the system's
temporary folder when there is none), is counted in the disk check and is removed whatever happens. The result equals the in-memory ``prune`` +
``quantize_(method 'gptq')`` + ``save_quantized`` (tested), which runs the same child on the same
checkpoint bytes.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from ..errors import SecompressError

log = logging.getLogger(__name__)


def check_gptq(config, profile, calib) -> None:
    """Refuse a streamed GPTQ job before any compute: calibration windows, coverage (as ``gptq_``), the extra."""
    from .coverage import check_coverage

    config.backend.require()
    if calib is None or len(calib) == 0:
        raise SecompressError("streamed GPTQ needs the calibration windows (plan_streamed(..., calib=ids))")
    if config.calibration != "all-experts":
        check_coverage(profile, config.fallback)  # an expert without tokens: error unless fallback 'rtn'


class LoadGptqLayers:
    """Replace the layer's planned units by the GPTQ codes gptqmodel wrote into ``gptq_dir``."""

    def __init__(self, eng, plan, gptq_dir: Path):
        self.eng, self.plan, self.dir = eng, plan, Path(gptq_dir)

    def on_layer(self, index: int, layer, inputs) -> None:
        from .gptq_codes import load_gptq_codes

        sub = self.plan.layer(index)
        if any(b is not None for b in sub.bits.values()):
            load_gptq_codes(self.eng.model, sub, self.dir)


def _work_dir(out: Path | None):
    """A folder next to the output (same file system as the disk check), removed on exit."""
    if out is None:
        return tempfile.TemporaryDirectory(prefix="secompress-gptq-")
    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.gptq-", dir=Path(out).resolve().parent)


def compress_gptq(plan, eval_ids=None, out=None, tokenizer=None, baseline: bool = True, overwrite: bool = False,
                  progress: bool = True, extra_files=None, sink: bool = False):
    """The streamed GPTQ run of ``plan`` (see the module docstring); returns a StreamedResult (baseline
    perplexity and sink health from the pruning pass when pruning, compressed ones from the last pass)."""
    from ..checkpoints import load_config, load_tokenizer
    from ..outputs import check_output_dir
    from ..streamed import check_disk, compress_streamed
    from .gptq import gptq_quantize

    t0 = time.perf_counter()
    job, q = plan.job, plan.job.quant
    pruning = plan.kept is not None
    plain = sum(s.nbytes for s in plan.out_specs)  # the pruned checkpoint; gptqmodel's output is about the export
    if out is not None:
        out = check_output_dir(out, overwrite)
        check_disk(out, 2 * plan.output_bytes + (plain if pruning else 0))
    if tokenizer is None:  # gptqmodel saves the tokenizer of the checkpoint it quantizes
        tokenizer = load_tokenizer(plan.path)
    extra = {}
    with _work_dir(out) as work:
        work = Path(work)
        src, first = plan.path, None
        if pruning:
            plain_plan = dataclasses.replace(  # a work copy for gptqmodel: plain, in the compute dtype
                plan, job=dataclasses.replace(job, quant=None), quant_plan=None, calib=None, report={},
                export_dtype=job.dtype, as_stored=False)
            src = work / "pruned"
            first = compress_streamed(plain_plan, eval_ids if baseline else None, src, tokenizer, baseline=True,
                                      progress=progress, sink=sink)
            extra["pruned_seconds"] = first.seconds
            if first.loss_after is not None:
                extra["loss_pruned"] = first.loss_after
        t = time.perf_counter()
        log.info("gptqmodel quantizes %s in a child process (its own copy of the model, in its memory)", src)
        info = gptq_quantize(src, tokenizer, plan.quant_plan, plan.calib, work / "gptq", bits=q.bits,
                             group_size=q.group_size, symmetric=q.symmetric, fallback=q.fallback,
                             batch_size=q.options.batch_size, all_experts=q.calibration == "all-experts")
        extra["gptq_seconds"] = time.perf_counter() - t
        extra["gptq"] = {k: v for k, v in info.items() if k in ("load_s", "quantize_s")}
        second = dataclasses.replace(plan, path=Path(src), config=load_config(src), kept=None, removal=None,
                                     selection=None, gptq_dir=work / "gptq")

        def side(r):
            if pruning:
                r = dataclasses.replace(r, loss_before=first.loss_before, sink_before=first.sink_before)
            r = dataclasses.replace(r, plan=plan, seconds=time.perf_counter() - t0)
            return extra_files(r) if extra_files else {}

        res = compress_streamed(second, eval_ids, out, tokenizer, baseline=baseline and not pruning,
                                overwrite=overwrite, progress=progress, extra_files=side, sink=sink)
    res.plan = plan
    if pruning:
        res.loss_before, res.sink_before = first.loss_before, first.sink_before
    res.extra.update(extra)
    res.seconds = time.perf_counter() - t0
    return res
