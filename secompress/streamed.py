"""Prune, quantize, export and evaluate a checkpoint layer by layer (see :mod:`secompress.engine`).

    plan = plan_streamed("ckpt/", StreamedJob(prune=PruneConfig(0.25), quant=QuantConfig(bits=4)), profile)
    print(plan.describe())            # streamed, device, estimated peak memory and output size
    res = compress_streamed(plan, eval_ids, out="out/model", tokenizer=tok)

Two passes over the checkpoint make a compress run: the streamed profile (the Super-Expert
rule compares maxima across layers, so every layer must be seen before any is changed), then
this pass. Everything that does not need weights is decided first, on the meta skeleton: the
experts to remove (score-based methods from the profile's statistics) or the final expert count
/ width (merging and HEAPr, :mod:`secompress.prune.streamed_merge`), the compressed config and
shapes, the quantization plan, the export's config (compressed-tensors: refused here when vLLM's
rule would reject it), the size on disk (checked against the free space) and the peak memory.
Then one pass per decoder layer: materialise, run the evaluation windows through the original
layer (baseline perplexity and sink health), remove or merge experts, quantize (RTN or
bitsandbytes on the layer's part of the plan; GPTQ codes read back from gptqmodel's checkpoint,
:mod:`secompress.quant.gptq_stream`), run the windows through the compressed layer, write its
tensors (compressed-tensors :mod:`secompress.quant.ct_stream`, bitsandbytes
:mod:`secompress.quant.bnb_stream`, or dequantized + codes), drop it. The results are
bit-identical to the in-memory path (tests on all seven architectures). NAEE (it reconstructs
layer outputs from many candidate sets) stays in memory only.
Legend: N windows, S sequence length, H hidden size, L decoder layers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import as_saved, check_model, load_config, write_model_config
from .engine import LayerEngine, LayerInputs, Stream
from .errors import SecompressError
from .outputs import atomic_dir, check_output_dir
from .prune.scores import SCORERS
from .shards import ShardWriter, TensorSpec, specs_of
from .streaming import Checkpoint, build_skeleton

log = logging.getLogger(__name__)
GiB = 2**30
RUNTIME_BYTES = GiB // 2  # the Python, torch and transformers runtime itself
STREAMED_FORMATS = ("compressed-tensors", "dequantized")
STREAMED_METHODS = ("rtn", "gptq", "bnb")  # gptq: quant/gptq_stream.py; bnb (its own format): quant/bnb_stream.py


@dataclass(frozen=True)
class StreamedJob:
    prune: object | None = None  # PruneConfig (a score method)
    quant: object | None = None  # QuantConfig (method rtn, gptq or bnb)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # resolved already (secompress.devices.resolve_device)
    batch_size: int = 8  # evaluation windows per chunk (as secompress.perplexity.mean_loss)

    def __post_init__(self):
        from .prune.api import MERGE_METHODS, NEURON_METHODS

        restructure = (*MERGE_METHODS, *NEURON_METHODS)
        if self.prune is not None and self.prune.method not in (*SCORERS, *restructure):
            raise SecompressError(f"pruning method '{self.prune.method}' runs in memory only (it needs more than "
                                  "the profile's statistics); use a score method (reap, frequency, easy_ep, random), "
                                  f"{', '.join(restructure)} with streaming, or model.streaming: false")
        if self.prune is not None and self.prune.method in MERGE_METHODS and self.quant is not None:
            raise SecompressError(f"merging ('{self.prune.method}') and quantization cannot share one streamed pass "
                                  "(the quantization plan needs the merged experts' ids, known only during the "
                                  "pass): prune --streaming first, then quantize its output, or model.streaming: false")
        if self.quant is not None and self.quant.method not in STREAMED_METHODS:
            raise SecompressError(f"quantization method '{self.quant.method}' runs in memory only; streaming "
                                  f"supports {', '.join(STREAMED_METHODS)} (or set model.streaming: false)")
        if self.quant is not None and self.quant.method == "gptq" and self.quant.format == "gptqmodel":
            raise SecompressError("format 'gptqmodel' (gptqmodel's own folder) is written in memory only; streamed "
                                  f"GPTQ writes {' or '.join(STREAMED_FORMATS)} (--format, stages.quantize.format)")
        if self.quant is not None and self.quant.method != "bnb" and self.quant.format not in STREAMED_FORMATS:
            raise SecompressError(f"export format '{self.quant.format}' is written in memory only; the streamed "
                                  f"engine writes {' or '.join(STREAMED_FORMATS)} (--format, "
                                  "stages.quantize.format) or set model.streaming: false")

    @property
    def format(self) -> str | None:
        return None if self.quant is None else self.quant.format


@dataclass
class StreamedPlan:
    """Everything decided before any weight is read."""

    path: Path
    job: StreamedJob
    config: object  # the input's transformers config
    model: object  # the compressed model's skeleton (meta)
    kept: dict[int, list[int]] | None  # MoE layer -> kept original expert ids
    removal: object | None  # RemovalReport (sizes from the meta skeletons)
    selection: object | None
    quant_plan: object | None
    out_specs: list[TensorSpec]
    code_specs: list[TensorSpec]
    code_shapes: dict[str, list]
    checkpoint_bytes: int
    layer_bytes: int  # the largest decoder layer in the compute dtype
    rest_bytes: int  # embeddings, final norm, output head
    profile: object | None = None
    restructure: object | None = None  # merging / HEAPr: secompress.prune.streamed_merge.RestructurePlan
    ct: tuple | None = None  # (QuantizationConfig, compatibility) of a compressed-tensors export
    calib: torch.Tensor | None = None  # [N, S] calibration windows (GPTQ's, handed to gptqmodel)
    gptq_dir: Path | None = None  # GPTQ: the folder gptqmodel wrote; its codes are read per layer (gptq_stream)
    export_bytes: int | None = None  # the export's size when the method estimates its own (bnb)

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
        el = torch.empty((), dtype=self.job.dtype, device="meta").element_size()
        dense = sum(math.prod(shape) for shape, _, _ in self.code_shapes.values()) * el
        scales = sum(s.nbytes for s in self.code_specs if s.name.endswith(".scales"))
        return plain - dense + codes + scales  # scales float16 -> float32

    def peak_bytes(self, num_windows: int = 0, seq_len: int = 0, streams: int = 2) -> int:
        """Estimated peak memory: the embeddings and head, a layer materialised plus what quantization
        makes of it (codes, then the dequantized copy written out: about 2.5 layers at the worst moment)
        plus the next layer, read meanwhile (:class:`~secompress.prefetch.Prefetcher`),
        the streams' hidden states [N, S, H] in float32, one chunk's attention scores and the runtime;
        merging / HEAPr: the calibration stream [Nc, S, H] twice (what it carried into the layer too) and,
        for HEAPr's Fisher Hessian, every layer's calibration input kept for the backward pass."""
        H = int(getattr(self.config, "hidden_size", 0))
        heads = int(getattr(self.config, "num_attention_heads", 1))
        hidden = streams * num_windows * seq_len * H * 4
        attn = self.job.batch_size * heads * seq_len * seq_len * 4 * 2
        factor = (2.5 if self.job.quant is not None else 1.5) + 1.0  # + the prefetched next layer
        return int(self.rest_bytes + factor * self.layer_bytes + hidden + attn + self._restructure_bytes(H)
                   + RUNTIME_BYTES)

    def _restructure_bytes(self, H: int) -> int:
        r = self.restructure
        if r is None:
            return 0
        one = math.prod(r.calib.shape) * H * 4  # [Nc, S, H] float32
        if not r.fisher:
            return 2 * one
        kept = int(self.config.num_hidden_layers) - min(r.moe_layers)  # inputs of layers first..L-1
        return (2 + kept) * one  # + the dL/dh being propagated

    def describe(self, num_windows: int = 0, seq_len: int = 0) -> str:
        return (f"plan: streamed layer by layer on {self.job.device}; checkpoint {self.checkpoint_bytes / GiB:.2f} "
                f"GiB, largest layer {self.layer_bytes / GiB:.2f} GiB, embeddings+head {self.rest_bytes / GiB:.2f} "
                f"GiB; estimated peak memory {self.peak_bytes(num_windows, seq_len) / GiB:.2f} GiB; "
                f"output {self.output_bytes / GiB:.2f} GiB")


def _dtype_bytes(info: dict, dtype: torch.dtype) -> int:
    n = math.prod(info["shape"])
    floating = info["dtype"].startswith(("F", "BF"))
    return n * (torch.empty((), dtype=dtype, device="meta").element_size() if floating else 1)


def checkpoint_sizes(path: str | Path, layers_path: str, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """From the safetensors headers: (bytes on disk, largest decoder layer, everything outside the layers,
    the whole model), the last three in ``dtype``."""
    ck = Checkpoint(path)
    disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    per_layer: dict[str, int] = {}
    rest = 0
    head = layers_path + "."
    for k, (_, _, info) in ck.where.items():
        b = _dtype_bytes(info, dtype)
        if k.startswith(head):
            idx = k[len(head):].split(".", 1)[0]
            per_layer[idx] = per_layer.get(idx, 0) + b
        else:
            rest += b
    return disk, max(per_layer.values(), default=0), rest, rest + sum(per_layer.values())


def _cast_meta(model, dtype: torch.dtype) -> None:
    """Parameters of a meta skeleton to the compute dtype (what materialise gives them)."""
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point():
                mod._parameters[n] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta"),
                                                        requires_grad=False)


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


def plan_streamed(path: str | Path, job: StreamedJob, profile=None, protect: bool | None = None,
                  calib: torch.Tensor | None = None) -> StreamedPlan:
    """Decide everything on the meta skeleton (no weights read); raises before any compute.

    ``protect`` overrides both configs' ``protect_super_experts`` (False: the SE-unaware variant);
    ``calib`` [N, S]: the calibration windows merging and HEAPr decide from (GPTQ: gptqmodel's)."""
    from .prune.api import plan_for, score_selection
    from .prune.structural import remove_experts

    path = Path(path)
    config = load_config(path)
    model = build_skeleton(copy.deepcopy(config))  # pruning changes the skeleton's config
    adapter = check_model(model)
    _cast_meta(model, job.dtype)
    disk, layer_b, rest_b, _ = checkpoint_sizes(path, adapter.layers_path, job.dtype)
    kept = removal = selection = qplan = restructure = None
    prof = profile
    if job.prune is not None and job.prune.method not in SCORERS:  # merging / HEAPr: final shapes now, ids in the pass
        from .prune.streamed_merge import plan_restructure

        if profile is None:
            raise SecompressError("streamed merging and HEAPr need the streamed profile (Super Experts): profile first")
        pcfg = job.prune if protect is None else dataclasses.replace(job.prune, protect_super_experts=protect)
        restructure = plan_restructure(model, adapter, pcfg, profile, calib)
    elif job.prune is not None:
        if profile is None:
            raise SecompressError("streamed pruning needs the streamed profile's statistics: profile first")
        pcfg = job.prune if protect is None else dataclasses.replace(job.prune, protect_super_experts=protect)
        pplan = plan_for(model, pcfg.ratio)
        selection = score_selection(pplan, adapter.moe_layer_indices(model), pcfg, profile)
        removal = remove_experts(model, adapter, selection.removed)  # on meta: shapes and sizes only
        kept = removal.kept
    if job.quant is not None:
        from .quant.api import plan_quantization

        qcfg = job.quant if protect is None else dataclasses.replace(job.quant, protect_super_experts=protect)
        if removal is not None and prof is not None:
            prof = _remapped(prof, removal)
        if qcfg.method == "gptq" and prof is None:
            raise SecompressError("streamed GPTQ needs the streamed profile (calibration coverage, Super Experts): "
                                  "profile first")
        qplan = plan_quantization(model, qcfg, profile=prof)
        if qcfg.method == "gptq":
            from .quant.gptq_stream import check_gptq

            check_gptq(qcfg, prof, calib)  # calibration windows and coverage, before any compute
    sd = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
    out_specs = specs_of(as_saved(model, sd))
    cspecs, cshapes, export_bytes = [], {}, None
    if job.quant is not None and job.quant.method == "bnb":  # its own format: no codes file
        from .quant.bnb_stream import bnb_bytes

        export_bytes = bnb_bytes(model, qplan, job.dtype)
    elif qplan is not None:
        cspecs, cshapes = code_specs(qplan, job.quant.group_size)
    ct = None
    if job.format == "compressed-tensors":
        from .errors import require
        from .quant.ct_stream import ct_config

        require("compressed_tensors", "ct", "the compressed-tensors export")
        ct = ct_config(model, qplan)  # refuses (se_mode expert, a config vLLM rejects) before any compute
    return StreamedPlan(path, job, config, model, kept, removal, selection, qplan, out_specs, cspecs, cshapes,
                        disk, layer_b, rest_b, profile, restructure, ct,
                        calib=calib if job.quant is not None and job.quant.method == "gptq" else None,
                        export_bytes=export_bytes)


def _remapped(prof, removal):
    """The profile with the pruned model's expert numbering (as the in-memory run passes it to quantize)."""
    from .prune.api import remap_profile

    class _R:  # remap_profile reads only these
        num_experts_after = removal.num_experts_after
        kept = removal.kept

    return remap_profile(prof, _R)


# ---- per-layer callbacks ------------------------------------------------------------------------------
class PruneLayers:
    """Remove the planned experts of each MoE layer as it comes (same slicing as the in-memory path)."""

    def __init__(self, eng: LayerEngine, kept: dict[int, list[int]], num_experts: int):
        self.eng, self.kept, self.E = eng, kept, num_experts

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        from .prune.structural import keep_layer_experts

        if index in self.kept:
            keep_layer_experts(self.eng.adapter.block_of(layer), self.eng.adapter, self.kept[index],
                               self.eng.adapter.block_path(index))


class QuantizeLayers:
    """RTN-quantize the layer's part of the plan, on the device the layer lives on."""

    def __init__(self, eng: LayerEngine, plan, group_size, symmetric: bool):
        from .quant import rtn

        self.eng, self.plan = eng, plan
        self.make = lambda key, w, bits: rtn.quantize(w, bits, group_size, symmetric)

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        from .quant.api import apply_plan

        sub = self.plan.layer(index)
        if any(b is not None for b in sub.bits.values()):
            apply_plan(self.eng.model, sub, self.make)


def _quantizer(eng: LayerEngine, plan: StreamedPlan):
    """The per-layer quantization callback of the plan's method."""
    q = plan.job.quant
    if q.method == "gptq":
        from .quant.gptq_stream import LoadGptqLayers

        return LoadGptqLayers(eng, plan.quant_plan, plan.gptq_dir)
    if q.method == "bnb":
        from .quant.bnb_stream import QuantizeLayersBnb

        return QuantizeLayersBnb(eng, plan.quant_plan, q.options.quant_type)
    return QuantizeLayers(eng, plan.quant_plan, q.group_size, q.symmetric)


class ExportLayers:
    """Write the layer's tensors (dequantized where quantized) as save_pretrained names them, and its codes."""

    def __init__(self, eng: LayerEngine, writer: ShardWriter, codes: ShardWriter | None, plan):
        self.eng, self.writer, self.codes, self.plan = eng, writer, codes, plan

    def write_rest(self) -> None:
        head = self.eng.adapter.layers_path + "."
        sd = {k: v for k, v in self.eng.model.state_dict().items() if not k.startswith(head)}
        for k, v in as_saved(self.eng.model, sd).items():
            self.writer.write(k, v)

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        from .quant.api import dequantized, quantized_tensors

        prefix = self.eng.layer_prefix(index)
        with dequantized(self.eng.model):
            sd = {prefix + k: v for k, v in self.eng.layers[index].state_dict().items()}
            for k, v in as_saved(self.eng.model, sd).items():
                self.writer.write(k, v)
            del sd
        if self.codes is not None:
            tensors, _ = quantized_tensors(self.eng.model, self.plan.layer(index))
            for k, v in tensors.items():
                self.codes.write(k, v)


class ExportLayersCT:
    """Write each layer in compressed-tensors format as it finishes (:mod:`secompress.quant.ct_stream`)."""

    def __init__(self, eng: LayerEngine, writer, plan, qc, symmetric: bool):
        self.eng, self.writer, self.plan, self.qc, self.symmetric = eng, writer, plan, qc, symmetric

    def write_rest(self) -> None:
        from .quant.ct_stream import rest_tensors

        self.writer.write_part(rest_tensors(self.eng.model, self.eng.adapter))

    def on_layer(self, index: int, layer, inputs: LayerInputs) -> None:
        from .quant.ct_stream import layer_tensors

        self.writer.write_part(layer_tensors(self.eng.model, self.eng.adapter, index, self.plan.layer(index),
                                             self.qc, self.symmetric))


# ---- the pass -----------------------------------------------------------------------------------------
@dataclass
class StreamedResult:
    plan: StreamedPlan
    loss_before: float | None = None
    loss_after: float | None = None
    out: Path | None = None
    seconds: float = 0.0
    prune_result: object | None = None
    extra: dict = field(default_factory=dict)
    sink_before: object | None = None  # SinkHealth of the original model (``sink=True``, baseline stream)
    sink_after: object | None = None  # SinkHealth of the compressed model (``sink=True``)

    @property
    def perplexity_before(self) -> float | None:
        return None if self.loss_before is None else math.exp(self.loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return None if self.loss_after is None else math.exp(self.loss_after)


def check_disk(out: Path, need: int) -> None:
    """Refuse (before any compute) when the output's file system lacks ``need`` bytes (+ 1% margin)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need * 1.01:
        raise SecompressError(f"the export needs {need / GiB:.2f} GiB but '{parent}' has {free / GiB:.2f} GiB free; "
                              "free space or write elsewhere")


def compress_streamed(plan: StreamedPlan, eval_ids: torch.Tensor | None = None, out: str | Path | None = None,
                      tokenizer=None, baseline: bool = True, overwrite: bool = False, progress: bool = True,
                      extra_files=None, sink: bool = False) -> StreamedResult:
    """One streamed pass: baseline and compressed perplexity over ``eval_ids`` [N, S] (when given) and the
    export into ``out`` (when given; atomic, with the tokenizer, config, plan, codes and the files
    ``extra_files(result) -> {name: text}`` gives once the perplexities are known). ``sink``: also the
    baseline and compressed :class:`~secompress.sink.SinkHealth` over ``eval_ids``
    (:mod:`secompress.sink_meter`; equal to :func:`~secompress.sink.measure_sink` in memory)."""
    t0 = time.perf_counter()
    job = plan.job
    if plan.quant_plan is not None and job.quant.method == "gptq" and plan.gptq_dir is None:
        from .quant.gptq_stream import compress_gptq  # gptqmodel first, then this pass over its codes

        return compress_gptq(plan, eval_ids, out, tokenizer, baseline, overwrite, progress, extra_files, sink)
    if out is not None:
        out = check_output_dir(out, overwrite)
        check_disk(out, plan.output_bytes)
    eng = LayerEngine(plan.path, job.dtype, torch.device(job.device), plan.config)
    callbacks = []
    if plan.kept is not None:
        callbacks.append(PruneLayers(eng, plan.kept, plan.removal.num_experts_before))
    if plan.quant_plan is not None:
        callbacks.append(_quantizer(eng, plan))
    streams = {}
    chunks = list(eval_ids.split(job.batch_size)) if eval_ids is not None else []
    meters = {}
    if sink and chunks:
        from .sink_meter import SinkMeter

        meters = {n: SinkMeter(len(eng.layers)) for n in (("before", "after") if baseline else ("after",))}
    if chunks:
        if baseline:
            streams["before"] = Stream(chunks, before=True, watch=meters["before"].watch if meters else None)
        streams["after"] = Stream(chunks, watch=meters["after"].watch if meters else None)
    res = StreamedResult(plan)
    if plan.restructure is not None:  # merging / HEAPr: each MoE layer decided from the calibration windows
        from .prune.streamed_merge import restructure_callback

        merger = restructure_callback(eng, plan.restructure, progress)
        callbacks.insert(0, merger)  # before quantization and export
        streams.update(merger.streams)
        res.extra["restructure"] = merger.record
    log.info("%s", plan.describe(*(eval_ids.shape if eval_ids is not None else (0, 0))))

    def one_pass(folder: Path | None):
        writer = codes = None
        if folder is not None and job.quant is not None and job.quant.method == "bnb":
            from .quant.bnb_stream import ExportLayersBnb

            exporter = ExportLayersBnb(eng, folder, plan.quant_plan)
            writer = exporter.writer
            eng.load_rest()
            exporter.write_rest()
            callbacks.append(exporter)
        elif folder is not None and plan.ct is not None:
            from .shards import PartWriter

            writer = PartWriter(folder)
            exporter = ExportLayersCT(eng, writer, plan.quant_plan, plan.ct[0], bool(job.quant.symmetric))
            eng.load_rest()
            exporter.write_rest()
            callbacks.append(exporter)
        elif folder is not None:
            writer = ShardWriter(folder, plan.out_specs)
            if plan.code_specs:
                from .quant.api import CODES_NAME

                codes = ShardWriter(folder, plan.code_specs, stem=CODES_NAME.removesuffix(".safetensors"),
                                    max_shard_bytes=1 << 62, metadata={"format": "secompress-rtn", "version": "1",
                                                                       "shapes": json.dumps(plan.code_shapes)})
            exporter = ExportLayers(eng, writer, codes, plan.quant_plan)
            eng.load_rest()
            exporter.write_rest()
            callbacks.append(exporter)
        final = eng.run(streams, callbacks, progress=progress, desc="compress (streaming)")
        if "before" in final:
            res.loss_before = eng.mean_loss(final.pop("before"), chunks)
        if "after" in final:
            res.loss_after = eng.mean_loss(final.pop("after"), chunks)
        if "before" in meters:
            res.sink_before = meters["before"].health()
        if "after" in meters:
            res.sink_after = meters["after"].health()
        if writer is not None:
            writer.close()
            if codes is not None:
                codes.close()
            _write_side_files(plan, folder, tokenizer, extra_files(res) if extra_files else {})

    if out is None:
        one_pass(None)
    else:
        with atomic_dir(out, overwrite) as tmp:
            one_pass(tmp)
        res.out = out
    res.seconds = time.perf_counter() - t0
    return res


def _write_side_files(plan: StreamedPlan, folder: Path, tokenizer, extra_files: dict[str, str]) -> None:
    from .quant.api import PLAN_NAME

    model = plan.model
    model.config.dtype = plan.job.dtype  # the weights are written in the compute dtype, as in memory
    if plan.job.quant is not None and plan.job.quant.method == "bnb":
        from .quant.bnb_stream import finish_bnb

        finish_bnb(folder, model, plan.quant_plan, plan.job, tokenizer)
    elif plan.ct is not None:
        from .quant.ct_stream import finish_ct

        finish_ct(folder, model, plan.ct[0], plan.quant_plan, plan.ct[1], plan.job.dtype, tokenizer)
    else:
        write_model_config(model, folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if plan.quant_plan is not None:
            (folder / PLAN_NAME).write_text(json.dumps(plan.quant_plan.to_json(), indent=2) + "\n")
    for name, text in extra_files.items():
        (folder / name).write_text(text)


def run_cli(args, prune_cfg=None, quant_cfg=None) -> int:
    """``secompress prune|quantize --streaming``: profile (streamed, unless --profile), one streamed pass, export."""
    from .checkpoints import load_config, load_tokenizer, resolve_dtype
    from .data import load_calibration
    from .devices import resolve_device
    from .profile import ProfileConfig, profile
    from .cli_args import load_profile_arg

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data))  # fail before any compute
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, load_config(args.model, args.revision, args.trust_remote_code))
    job = StreamedJob(prune=prune_cfg, quant=quant_cfg, dtype=dtype, device=str(device), batch_size=args.batch_size)
    if prune_cfg is not None:  # a ratio the router (or the expert width) cannot take fails before the profile pass
        from .prune.api import plan_for

        plan_for(build_skeleton(load_config(args.model, args.revision, args.trust_remote_code)), prune_cfg.ratio,
                 prune_cfg.method)
    tok = load_tokenizer(args.model, args.revision, args.trust_remote_code)
    n_eval = getattr(args, "eval_samples", 0) if prune_cfg is not None else 0
    samples = args.num_samples
    seq_len = args.seq_len
    both = load_calibration(args.data, tok, samples + n_eval, seq_len)
    eval_ids = both.input_ids[samples:] if n_eval else None
    if args.profile:
        prof = load_profile_arg(args.profile)
    else:
        from .data import CalibrationData

        calib = CalibrationData(both.input_ids[:samples], both.source, both.sha256)
        prof = profile(args.model, tok, data=calib, device=str(device),
                       config=ProfileConfig(num_samples=samples, seq_len=seq_len, streaming=True, dtype=args.dtype,
                                            batch_size=args.batch_size))
    plan = plan_streamed(args.model, job, prof, calib=both.input_ids[:samples])
    print(plan.describe(*(eval_ids.shape if eval_ids is not None else (0, 0))))

    def side(res: StreamedResult) -> dict[str, str]:
        from .prune.api import REPORT_NAME, build_result
        from .prune.streamed_merge import streamed_result

        ppl = (res.perplexity_before, res.perplexity_after)
        if plan.restructure is not None:
            pr = streamed_result(plan.restructure, plan.model, res.extra["restructure"], prof, both.source, ppl,
                                 res.seconds)
        elif plan.removal is not None:
            pr = build_result(prune_cfg, plan.model, plan.removal, plan.selection, prof, sorted(plan.kept),
                              both.source, None, ppl, res.seconds)
        else:
            return {}
        pr.model = str(args.model)
        return {REPORT_NAME: json.dumps(pr.to_json(), indent=2) + "\n"}

    res = compress_streamed(plan, eval_ids, args.out, tok, overwrite=args.overwrite, extra_files=side)
    if plan.quant_plan is not None:
        print(plan.quant_plan.table())
    if res.loss_before is not None:
        print(f"held-out perplexity {res.perplexity_before:.3f} -> {res.perplexity_after:.3f}")
    print(f"wrote {args.out} (streamed layer by layer on {device})")
    return 0
