"""Layer sources: where the one loop (:func:`~secompress.pipeline.driver.run_pass`) gets its decoder layers.

    Resident(model)     a model already in memory: nothing is loaded or released
    Streamed(source)    a meta skeleton; each decoder layer is materialised from the safetensors shards
                        when the loop reaches it (the next layer's bytes read meanwhile, in a background
                        thread: :class:`~secompress.pipeline.prefetch.Prefetcher`) and dropped after

Both expose what a step needs: ``model`` (the live model or the skeleton holding the current layer),
``adapter``, ``dtype``, ``device``, ``layers`` and ``layer_prefix(i)``, and the model's own head on a
chunk's final hidden states (:meth:`LayerSource.logits`, :meth:`LayerSource.mean_loss`). A step never
asks which source runs it. A streamed source serves one pass: build a new one for each pass.
Legend: B windows in a chunk, S sequence length, H hidden size, V vocabulary.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..checkpoints import check_model
from ..perplexity import nll_sum
from ..streaming import assign, build_skeleton, layer_tensors, materialise_rest, still_fits
from .driver import run_pass
from .prefetch import Prefetcher

log = logging.getLogger(__name__)


class _Done(nn.Module):
    """Stands in for a decoder layer a streamed pass has finished (its weights are gone)."""


class _Replay(nn.Module):
    """Stands in for the first decoder layer: returns the given final hidden states."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


class LayerSource:
    """What both sources share; subclasses say how a layer is opened and closed."""

    resident = False

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, torch.device(device)
        self.adapter = check_model(model)

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def layer_prefix(self, i: int) -> str:
        return f"{self.adapter.layers_path}.{i}."

    def load_rest(self) -> None:
        """Everything outside the decoder layers on the device (embeddings, final norm, head)."""

    def open(self, i: int, then: int | None = None) -> nn.Module:
        """Decoder layer ``i``, ready to run; ``then``: the layer the caller opens next (a streamed
        source reads it meanwhile)."""
        return self.layers[i]

    def close(self, i: int) -> None:
        """Done with layer ``i``."""

    def end(self) -> None:
        """Done with the pass, finished or not (a streamed source drops the layer it is reading ahead)."""

    def fresh(self) -> "LayerSource":
        """A source for another pass over the same input (resident: the same model)."""
        raise NotImplementedError

    def run(self, streams=None, steps=(), progress: bool = True, desc: str = "layers"):
        """:func:`~secompress.pipeline.driver.run_pass` over this source."""
        return run_pass(self, streams, steps, progress, desc)

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


class Resident(LayerSource):
    """A model in memory (on one device, or placed over several by ``device_map``)."""

    resident = True

    def __init__(self, model: nn.Module):
        emb = model.get_input_embeddings().weight
        super().__init__(model, emb.dtype, emb.device)

    def fresh(self) -> "Resident":
        return Resident(self.model)


class Streamed(LayerSource):
    """One streamed pass over ``source``'s shards (a :class:`~secompress.source.Source`); ``config``: the
    skeleton's config when it differs from the source's (e.g. a checkpoint written earlier in the run)."""

    def __init__(self, source, config=None):
        import copy

        self.source, self._config = source, config
        self.ckpt = source.checkpoint
        super().__init__(build_skeleton(copy.deepcopy(config) if config is not None else source.fresh_config()),
                         source.dtype, source.device)
        self._rest_loaded = False
        self._ahead = Prefetcher(self._read)

    @property
    def path(self):
        return self.source.path

    def fresh(self) -> "Streamed":
        return Streamed(self.source, self._config)

    @torch.no_grad()
    def load_rest(self) -> None:
        if self._rest_loaded:
            return
        with self.ckpt.reading():
            materialise_rest(self.model, self.ckpt, self.adapter, self.dtype, self.device,
                             skip={id(m) for m in self.layers.modules()})
        self.model.tie_weights()  # a tied output head is not stored
        self._rest_loaded = True

    @torch.no_grad()
    def _read(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors from the shards (in the prefetch thread, or in the caller's)."""
        return layer_tensors(self.layers[i], self.layer_prefix(i), self.ckpt, self.adapter, self.dtype, self.device)

    @torch.no_grad()
    def open(self, i: int, then: int | None = None) -> nn.Module:
        layer = self.layers[i]
        tensors = self._ahead.get(i, then)  # read ahead while the caller worked on the layer before
        if then is None:
            self._ahead.close()
        if not still_fits(layer, tensors):  # a step changed the skeleton of this layer after it was read
            log.debug("layer %d changed after it was read ahead: reading it again", i)
            tensors = self._read(i)
        assign(layer, tensors)
        return layer

    @torch.no_grad()
    def close(self, i: int) -> None:
        """Release layer ``i``'s weights themselves (its modules keep no tensor), not only the list's reference
        to it: hooks and swapped forwards (e.g. the profile's ``instrument``) keep its modules alive until the
        pass ends, and with them every layer's tensors (a 24-layer 28.6 GB checkpoint then outgrows 24 GiB)."""
        for m in self.layers[i].modules():  # (not .to("meta"): bitsandbytes' Params4bit cannot be rebuilt there)
            for table in (m._parameters, m._buffers):
                for k in table:
                    table[k] = None
        self.layers[i] = _Done()

    def end(self) -> None:
        self._ahead.close()
