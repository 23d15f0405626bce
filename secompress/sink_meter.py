"""Sink health measured during a pass of the one loop, one decoder layer at a time (:mod:`secompress.pipeline`).

    meter = SinkMeter(num_layers)
    eng.run({"before": Stream(chunks, before=True, watch=meter.watch), ...})
    health = meter.health()            # what measure_sink(model, ids) gives on the same windows

The engine enters ``meter.watch(i, layer)`` around one stream's chunks going through decoder
layer ``i``; meanwhile the forward hooks :func:`~secompress.sink.measure_sink` uses
(:func:`~secompress.instrument.layer_output_hooks`) take the hidden states the layer outputs
and the attention probabilities its (eager) ``self_attn`` returns. measure_sink observes one
batch of ``batch_size`` windows per forward (the median |h| and the sink mass are means over
batches); a stream's chunks may hold another number of windows, so the rows are regrouped
into batches of ``batch_size`` in window order (a batch that straddles two chunks is
concatenated: at most one chunk's hidden states copied) and the remainder is observed when
the stream leaves the layer. Same rows, same batches, same math (:meth:`Recorder.observe_hidden`,
:func:`~secompress.instrument.edge_mass`, :func:`~secompress.sink.sink_health`).
Legend: B windows in a chunk or batch, S sequence length, H hidden size, heads attention heads.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from .instrument import Recorder, layer_output_hooks, sink_edge
from .sink import SINK_BATCH_SIZE, SinkHealth, sink_health


class _Regroup:
    """Tensors whose rows (dim 0, windows) arrive in pieces, handed to ``emit`` in groups of ``size``
    rows in arrival order; :meth:`flush` hands on the last, smaller group."""

    def __init__(self, size: int, emit: Callable[[torch.Tensor], None]):
        self.size, self.emit, self.pending, self.rows = size, emit, [], 0

    def add(self, x: torch.Tensor) -> None:
        self.pending.append(x)
        self.rows += len(x)
        while self.rows >= self.size:
            self.emit(self._take(self.size))

    def flush(self) -> None:
        if self.rows:
            self.emit(self._take(self.rows))

    def _take(self, n: int) -> torch.Tensor:
        parts, got = [], 0
        while got < n:
            p = self.pending.pop(0)
            k = min(n - got, len(p))
            parts.append(p[:k])
            if k < len(p):
                self.pending.insert(0, p[k:])
            got += k
        self.rows -= n
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class SinkMeter:
    """Per-layer sink statistics of one stream (see the module docstring)."""

    def __init__(self, num_layers: int, batch_size: int = SINK_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_layers, self.batch_size, self.rec = num_layers, batch_size, Recorder()

    @contextmanager
    def watch(self, index: int, layer: nn.Module):
        """Hooks on decoder layer ``index`` while a stream's chunks go through it; removed on exit."""
        rec = self.rec
        hidden = _Regroup(self.batch_size, lambda h: rec.observe_hidden(index, h))  # h [B, S, H]
        edges = _Regroup(self.batch_size, lambda e: rec.observe_sink_edge(index, e))  # e [B, heads, S-1]

        def on_attention(probs):  # [B, heads, S, S]; a small copy, so that a pending part frees probs
            if probs is not None and probs.shape[-2] >= 2:
                edges.add(sink_edge(probs).contiguous())

        handles = layer_output_hooks(layer, hidden.add, on_attention)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        hidden.flush()
        edges.flush()

    def health(self) -> SinkHealth:
        return sink_health(self.rec, self.num_layers)
