"""The layer-by-layer engine: every stage of a checkpoint larger than memory, one decoder layer at a time.

    eng = LayerEngine("ckpt/", torch.bfloat16, resolve_device("auto"))
    final = eng.run({"base": Stream(chunks, before=True), "new": Stream(chunks)}, [prune_cb, quant_cb, export_cb])
    ppl = eng.perplexity(final["new"], chunks)

One pass: the model skeleton is built on ``meta``; the embeddings, final norm and output head
are read onto the device; one weightless forward per stream records what decoder layer 0
receives (:func:`~secompress.streaming.capture_layer_inputs`). Then for each decoder layer:
materialise it from the shards onto the device, run the hidden states of the ``before``
streams through it, call every :class:`LayerCallback` (prune, quantize, export, ...) in order,
run the other streams through the layer as the callbacks left it, drop it. Hidden states stay
on the device. Peak memory is about one layer (and what callbacks make of it), the embeddings
and output head, and the streams' hidden states (N x S x H each; twice for a ``keep_inputs``
stream while the callbacks run), whatever the depth.
Anchors: llm-compressor's sequential pipeline (modifiers act in a per-layer callback) and
gptqmodel's layer loop.
Legend: N windows, S sequence length, H hidden size, V vocabulary.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import check_model, load_config
from .perplexity import nll_sum
from .prefetch import Prefetcher
from .streaming import (Checkpoint, _return_freed_memory, assign, build_skeleton, capture_layer_inputs, layer_tensors,
                        materialise_rest, run_layer)

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    """What decoder layer ``index`` receives, per stream and chunk: hidden states [B, S, H] and the
    other positional/keyword arguments (masks, position embeddings). ``hidden``/``args``: the
    streams that go through the layer after the callbacks; ``entered``/``entered_args``: the
    ``before`` streams opened with ``keep_inputs`` (what they carried into the layer, i.e. the
    original model's hidden states there)."""

    hidden: dict[str, list[torch.Tensor]]
    args: dict[str, list[tuple[tuple, dict]]]
    entered: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    entered_args: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)


class LayerCallback(Protocol):
    """A stage's per-layer step; it may change ``layer`` in place (prune, quantize) or read it (export)."""

    def on_layer(self, index: int, layer: nn.Module, inputs: LayerInputs) -> None: ...


@dataclass
class Stream:
    """Token windows [N, S] in chunks; ``before``: through each layer before the callbacks change it;
    ``keep_inputs`` (``before`` streams): also hand the callbacks the hidden states the stream
    carried into the layer (:attr:`LayerInputs.entered`), at the cost of one more [N, S, H] copy
    of the stream alive while the callbacks run; ``watch(i, layer)``: a context manager entered
    around the stream's chunks going through decoder layer ``i`` (e.g. the measuring hooks of
    :meth:`secompress.sink_meter.SinkMeter.watch`)."""

    chunks: list[torch.Tensor]
    before: bool = False
    keep_inputs: bool = False
    watch: Callable[[int, nn.Module], AbstractContextManager] | None = None

    def through(self, index: int, layer: nn.Module) -> AbstractContextManager:
        return self.watch(index, layer) if self.watch is not None else nullcontext()


class _Done(nn.Module):
    """Stands in for a decoder layer already processed (its weights are gone)."""


class _Replay(nn.Module):
    """Stands in for the first decoder layer at the end of a pass: returns the final hidden states."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


class LayerEngine:
    """One streamed pass over the checkpoint at ``path`` (build a new engine for each pass)."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device, config=None):
        self.path, self.dtype, self.device = Path(path), dtype, torch.device(device)
        self.ckpt = Checkpoint(path)
        self.config = copy.deepcopy(config) if config is not None else load_config(path)
        self.model = build_skeleton(self.config)
        self.adapter = check_model(self.model)
        self._rest_loaded = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def layer_prefix(self, i: int) -> str:
        return f"{self.adapter.layers_path}.{i}."

    @torch.no_grad()
    def load_rest(self) -> None:
        """Everything outside the decoder layers (embeddings, final norm, output head, rotary buffers)."""
        if self._rest_loaded:
            return
        with self.ckpt.reading():
            materialise_rest(self.model, self.ckpt, self.adapter, self.dtype, self.device,
                             skip={id(m) for m in self.layers.modules()})
        self.model.tie_weights()  # a tied output head is not stored
        self._rest_loaded = True

    @torch.no_grad()
    def run(self, streams: dict[str, Stream], callbacks: list[LayerCallback] = (), progress: bool = True,
            desc: str = "layers") -> dict[str, list[torch.Tensor]]:
        """The pass; returns each stream's final hidden states per chunk (on the device)."""
        self.load_rest()
        hidden, args = {}, {}
        for name, s in streams.items():
            h, a = capture_layer_inputs(self.model, self.adapter, [c.to(self.device) for c in s.chunks])
            hidden[name], args[name] = h, a
        layers = self.layers

        def read(j: int) -> dict[str, torch.Tensor]:
            return layer_tensors(layers[j], self.layer_prefix(j), self.ckpt, self.adapter, self.dtype, self.device)

        with Prefetcher(read, range(len(layers))) as pre:  # layer i+1 is read while layer i computes
            for i in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
                layer = layers[i]
                assign(layer, pre.get(i))
                entered = {n: hidden[n] for n, s in streams.items() if s.before and s.keep_inputs}
                for name, s in streams.items():
                    if s.before:
                        with s.through(i, layer):
                            hidden[name] = [run_layer(layer, h, *args[name][i][c]) for c, h in enumerate(hidden[name])]
                inputs = LayerInputs({n: hidden[n] for n, s in streams.items() if not s.before},
                                     {n: args[n][i] for n, s in streams.items() if not s.before},
                                     entered, {n: args[n][i] for n in entered})
                for cb in callbacks:
                    cb.on_layer(i, layers[i], inputs)
                    _return_freed_memory()  # what the callback freed (the pruned or quantized weights) goes back now
                layer = layers[i]  # a callback may have replaced modules inside it, not the layer itself
                for name, s in streams.items():
                    if not s.before:
                        with s.through(i, layer):
                            hidden[name] = [run_layer(layer, h, *args[name][i][c]) for c, h in enumerate(hidden[name])]
                layers[i] = _Done()
                del layer, inputs, entered
                _return_freed_memory()
        return hidden

    @contextmanager
    def replayed(self, final: torch.Tensor):
        """Inside, ``self.model(input_ids=ids, ...)`` for one chunk runs the model's own forward (final
        norm, output head, logit scaling, its loss with ``labels``) on that chunk's final hidden states
        ``final`` [B, S, H], the decoder layers stood in for (gradients reach ``final`` if it needs them)."""
        parent_path, _, attr = self.adapter.layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        real = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([_Replay(final)] + [_Replay(None) for _ in range(len(real) - 1)]))
        try:
            yield self.model
        finally:
            setattr(parent, attr, real)

    @torch.no_grad()
    def logits(self, final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, S, V] logits from one chunk's final hidden states (see :meth:`replayed`)."""
        with self.replayed(final) as model:
            return model(input_ids=ids.to(self.device), use_cache=False).logits

    def mean_loss(self, final: list[torch.Tensor], chunks: list[torch.Tensor]) -> float:
        """Mean next-token cross-entropy over the chunks, as :func:`secompress.perplexity.mean_loss`."""
        total, count = 0.0, 0
        for h, ids in zip(final, chunks):
            ids = ids.to(self.device)
            loss, n = nll_sum(self.logits(h, ids), ids)
            total += loss
            count += n
        if count == 0:
            raise ValueError("no tokens to evaluate")
        return total / count

