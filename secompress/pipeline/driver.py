"""The one loop: every stage runs as per-layer steps over a layer source (:mod:`.sources`).

    final = run_pass(layers, {"eval": Stream(chunks, before=True), "new": Stream(chunks)}, [prune, quant, writer])
    loss = layers.mean_loss(final["new"], chunks)

One pass: what decoder layer 0 receives is recorded with one forward of the model with its decoder
layers stood in for (:func:`~secompress.streaming.capture_layer_inputs`; no layer weight needed).
Then for each decoder layer: the source opens it (streamed: materialised from the shards, the next
layer read meanwhile; resident: already there), the hidden states of the ``before`` streams go through the layer as it is, every
step's ``on_layer(i, layer, inputs)`` runs in order (prune, quantize, calibrate, write, ...), the
other streams go through the layer as the steps left it, and the source closes it (streamed: its
weights are dropped). Hidden states stay on the device. Anchors: llm-compressor's sequential
pipeline (a modifier acts in a per-layer callback and does not know the pipeline) and GPTQModel's
layer loop (one processor per method).
Legend: N windows, B windows in a chunk, S sequence length, H hidden size.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..streaming import _return_freed_memory, capture_layer_inputs, run_layer

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    """What decoder layer ``index`` receives, per stream and chunk: hidden states [B, S, H] and the
    other positional/keyword arguments (masks, position embeddings). ``hidden``/``args``: the
    streams that go through the layer after the steps (e.g. calibration propagated through the
    layers compressed before this one: GPTQ's and static activation scales' inputs);
    ``entered``/``entered_args``: the ``before`` streams opened with ``keep_inputs`` (what they
    carried into the layer: the original model's hidden states there, what merging decides from)."""

    hidden: dict[str, list[torch.Tensor]]
    args: dict[str, list[tuple[tuple, dict]]]
    entered: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    entered_args: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)


class LayerStep(Protocol):
    """A stage's per-layer step; it may change ``layer`` in place (prune, quantize) or read it (export).
    Optional: ``streams`` (the streams it needs in the pass, {name: Stream}) and ``on_end(model)``
    (called once after the last layer: e.g. set the config's new expert count on a resident model)."""

    def on_layer(self, index: int, layer: nn.Module, inputs: LayerInputs) -> None: ...


@dataclass
class Stream:
    """Token windows [N, S] in chunks; ``before``: through each layer before the steps change it;
    ``keep_inputs`` (``before`` streams): also hand the steps the hidden states the stream carried
    into the layer (:attr:`LayerInputs.entered`), at the cost of one more [N, S, H] copy of the
    stream alive while the steps run; ``watch(i, layer)``: a context manager entered around the
    stream's chunks going through decoder layer ``i`` (e.g. the sink meter's hooks)."""

    chunks: list[torch.Tensor]
    before: bool = False
    keep_inputs: bool = False
    watch: Callable[[int, nn.Module], AbstractContextManager] | None = None

    def through(self, index: int, layer: nn.Module) -> AbstractContextManager:
        return self.watch(index, layer) if self.watch is not None else nullcontext()


def streams_of(steps) -> dict[str, Stream]:
    """The streams the steps declare (a name declared twice must be the same stream)."""
    out: dict[str, Stream] = {}
    for s in steps:
        for name, st in getattr(s, "streams", {}).items():
            if name in out and out[name] is not st:
                raise ValueError(f"two steps declare stream '{name}'")
            out[name] = st
    return out


@torch.no_grad()
def run_pass(src, streams: dict[str, Stream] | None = None, steps=(), progress: bool = True,
             desc: str = "layers") -> dict[str, list[torch.Tensor]]:
    """One pass of ``steps`` over the layers of ``src`` (a :class:`~secompress.pipeline.sources.LayerSource`);
    returns each stream's final hidden states per chunk (on the device). The steps' own streams
    (``step.streams``) join ``streams``."""
    streams = {**(streams or {}), **streams_of(steps)}
    src.load_rest()
    hidden, args = {}, {}
    for name, s in streams.items():
        h, a = capture_layer_inputs(src.model, src.adapter, [c.to(src.device) for c in s.chunks])
        hidden[name], args[name] = h, a
    try:
        for i in tqdm(range(len(src.layers)), desc=desc, unit="layer", disable=not progress):
            layer = src.open(i, then=i + 1 if i + 1 < len(src.layers) else None)  # streamed: i+1 read meanwhile
            entered = {n: hidden[n] for n, s in streams.items() if s.before and s.keep_inputs}
            for name, s in streams.items():
                if s.before:
                    with s.through(i, layer):
                        hidden[name] = [run_layer(layer, h, *args[name][i][c]) for c, h in enumerate(hidden[name])]
            inputs = LayerInputs({n: hidden[n] for n, s in streams.items() if not s.before},
                                 {n: args[n][i] for n, s in streams.items() if not s.before},
                                 entered, {n: args[n][i] for n in entered})
            for step in steps:
                step.on_layer(i, src.layers[i], inputs)
                _return_freed_memory()  # what the step freed (the pruned or quantized weights) goes back now
            layer = src.layers[i]  # a step may have replaced modules inside it, not the layer itself
            for name, s in streams.items():
                if not s.before:
                    with s.through(i, layer):
                        hidden[name] = [run_layer(layer, h, *args[name][i][c]) for c, h in enumerate(hidden[name])]
            src.close(i)
            del layer, inputs, entered
            _return_freed_memory()
    finally:
        src.end()
    for step in steps:
        if hasattr(step, "on_end"):
            step.on_end(src.model)
    return hidden
