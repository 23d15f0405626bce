"""GPTQ as a per-layer step in this process, on any layer source (the ``gptq`` backend's step).

    step = GptqLayers(src, plan, config)          # src: a layer source (secompress.pipeline: Resident, Streamed)
    run_pass(src, {CALIB_Q: Stream(chunks)}, [step])   # what backend.apply and compress.run_job do

Per decoder layer, as llm-compressor's sequential pipeline does with its default targets (the
decoder layers): the calibration windows entering the layer (``inputs.hidden[CALIB_Q]``, propagated
through the layers quantized before it, as GPTQModel and llm-compressor do) go once through the
layer as it is, under :func:`secompress.hessians.record_hessians`; every planned unit of the layer
(``plan.layer(index)``) is then GPTQ-quantized (:func:`secompress.quant.gptq_math.gptq`) from those
statistics, attention and MLP alike from that one pass (GPTQModel instead re-runs the layer after
its attention is quantized, so that the MLP's statistics see the quantized attention), and swapped
in as integer-coded modules (:func:`~secompress.quant.modules.apply_plan`, as the RTN step does).
The source then runs the windows through the quantized layer for the next one. Units planned
None are never touched (bit-identical).

Batching (rows are independent given a Hessian): Linear layers with one input (q/k/v, a shared
expert's gate/up) and equal bits are one problem with their rows stacked; an expert's gate and up
rows too; the experts of one bit-width run together ``[E, O, In]`` with one Hessian each (batched
Cholesky), or, under all-expert calibration, as one ``[E x 2I, H]`` problem with the one gate/up
Hessian. At most ``CHUNK_BYTES`` of float32 weights go into one call.
An expert that no calibration token reached (routed calibration) is an error, or RTN with
``fallback: rtn``.
Legend: O out features, In in features, E experts, I expert FFN size, H hidden size.
"""
from __future__ import annotations

import logging
import time

import torch

from ..checkpoints import check_model
from ..errors import CalibrationError, SecompressError, option
from ..experts import expert_weights
from ..hessians import record_hessians
from ..streaming import run_layer
from . import rtn
from .gptq_math import Factor, factor, gptq, hessian
from .backends.base import CALIB_Q
from .modules import apply_plan, planned_expert_layers, planned_linears

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 << 20  # float32 working weights per GPTQ call


class GptqLayers:
    """The per-layer GPTQ step (see the module docstring); ``report`` holds per-layer seconds."""

    def __init__(self, src, plan, config):
        self.src, self.plan, self.config, self.opts = src, plan, config, config.options
        self.all_experts = config.calibration == "all-experts"
        self.report: dict[int, dict] = {}

    def on_layer(self, index: int, layer, inputs) -> None:
        sub = self.plan.layer(index)
        if all(b is None for b in sub.bits.values()):
            return
        if CALIB_Q not in inputs.hidden:
            raise SecompressError(f"GPTQ needs the calibration stream '{CALIB_Q}' (windows through the layers "
                                  "quantized before this one)")
        model = self.src.model
        adapter = check_model(model)
        linears = {name: lin for name, _, _, lin, _ in planned_linears(model, sub)}
        layers = list(planned_expert_layers(model, sub, adapter))
        experts = {adapter.block_path(index): (ex, sorted(todo)) for _, ex, todo in layers}
        t0 = time.perf_counter()
        with record_hessians(linears, experts, self.all_experts) as rec:
            for c, h in enumerate(inputs.hidden[CALIB_Q]):
                run_layer(layer, h, *inputs.args[CALIB_Q][c])
        t1 = time.perf_counter()
        codes = self._linears(sub, linears, rec)
        for _, ex, todo in layers:
            codes.update(self._experts(index, ex, todo, rec.experts[adapter.block_path(index)]))
        del rec
        self.report[index] = {"calibration_s": t1 - t0, "gptq_s": time.perf_counter() - t1}

        def make(key: str, w: torch.Tensor, bits: int) -> rtn.QTensor:
            qt = codes.pop(key)
            if qt.codes.shape != w.shape or qt.bits != bits:
                raise SecompressError(f"GPTQ codes for '{key}' do not fit its weight {tuple(w.shape)} / {bits} bits")
            return qt

        apply_plan(model, sub, make)

    # ---- quantization of the recorded units ------------------------------------------------------
    def _gptq(self, w: torch.Tensor, h: torch.Tensor | Factor, bits: int) -> rtn.QTensor:
        c = self.config
        return gptq(w, h, bits, c.group_size, c.symmetric, self.opts.damp, self.opts.block_size,
                    self.opts.static_groups)

    def _rtn(self, w: torch.Tensor, bits: int) -> rtn.QTensor:
        return rtn.quantize(w, bits, self.config.group_size, self.config.symmetric)

    def _linears(self, sub, linears, rec) -> dict[str, rtn.QTensor]:
        """Planned Linear layers: one GPTQ problem per (shared input, bits), rows stacked."""
        out, groups = {}, {}
        for name, lin in linears.items():
            m = rec.linear.get(name)
            if m is None or m.rows == 0:
                self._uncalibrated(f"'{name}' received no calibration input")
                out[name] = self._rtn(lin.weight, sub.bits[name])
                continue
            groups.setdefault((id(m), sub.bits[name]), (m, []))[1].append(name)
        for (_, bits), (m, names) in groups.items():
            ws = [linears[n].weight for n in names]
            qt = self._gptq(torch.cat(ws), hessian(m.xtx, m.rows), bits)  # [sum O, In]
            r = 0
            for n, w in zip(names, ws):
                out[n] = _rows(qt, r, r + w.shape[0])
                r += w.shape[0]
        return out

    def _experts(self, index: int, experts, todo: dict, st) -> dict[str, rtn.QTensor]:
        """Planned experts of one layer, batched per bit-width (see the module docstring)."""
        out = {}
        tokens = dict(zip(st.ids, st.tokens))
        missing = sorted(e for e in todo if tokens[e] == 0)
        if missing:
            self._uncalibrated(f"layer {index}: {len(missing)} expert(s) got no calibration token in GPTQ's pass: "
                               f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
            for e in missing:
                name, bits = todo[e]
                for p, w in expert_weights(experts, e).items():
                    if p in ("gate_proj", "up_proj", "down_proj"):
                        out[f"{name}.{p}"] = self._rtn(w, bits)
        shared = None
        if st.shared and len(missing) < len(todo):
            shared = factor(hessian(st.gate_up, st.tokens[0]), self.opts.damp)  # one gate/up Hessian for all
        for bits in sorted({b for _, b in todo.values()}):
            es = [e for e in sorted(todo) if todo[e][1] == bits and tokens[e] > 0]
            w0 = expert_weights(experts, es[0]) if es else None
            if w0 is None:
                continue
            I, H = w0["gate_proj"].shape
            per = max(1, CHUNK_BYTES // (4 * 2 * I * H))  # experts per call
            for k in range(0, len(es), per):
                chunk = es[k:k + per]
                ws = [expert_weights(experts, e) for e in chunk]
                pos = [st.index(e) for e in chunk]
                gu = torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in ws])  # [n, 2I, H]
                h = shared if shared is not None else hessian(st.gate_up[pos], [st.tokens[p] for p in pos])
                q_gu = self._gptq(gu, h, bits)
                del gu
                dn = torch.stack([w["down_proj"] for w in ws])  # [n, H, I]
                q_dn = self._gptq(dn, hessian(st.down[pos], [st.tokens[p] for p in pos]), bits)
                for i, e in enumerate(chunk):
                    name = todo[e][0]
                    g = _rows(q_gu, 0, 2 * I, i)
                    out[f"{name}.gate_proj"], out[f"{name}.up_proj"] = _rows(g, 0, I), _rows(g, I, 2 * I)
                    out[f"{name}.down_proj"] = _rows(q_dn, 0, H, i)
        return out

    def _uncalibrated(self, what: str) -> None:
        if self.config.fallback != "rtn":
            raise CalibrationError(f"{what}. Use more or more varied calibration data, all-expert calibration "
                                   f"({option('calibration', 'all-experts')}), or {option('fallback', 'rtn')}")
        log.warning("%s: RTN (fallback 'rtn')", what)


def _rows(qt: rtn.QTensor, r0: int, r1: int, i: int | None = None) -> rtn.QTensor:
    """Rows r0:r1 of ``qt`` (of matrix ``i`` of a batch), as their own tensors."""
    pick = (lambda t: t[i, r0:r1]) if i is not None else (lambda t: t[r0:r1])
    return rtn.QTensor(*(pick(t).clone() for t in (qt.codes, qt.scales, qt.zeros)), qt.bits)
