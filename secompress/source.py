"""The checkpoint a run works on, resolved once: ``Source.open("Qwen/Qwen3-30B-A3B", dtype="auto", device="auto")``.

A source holds what every stage needs to know about its input: the name the user gave (a local
folder or a hub id), the revision and ``trust_remote_code`` setting, the local folder holding the
config, tokenizer and safetensors shards (a hub id is resolved once, through the local Hugging Face
cache when offline), the transformers config (read once), the architecture's adapter, the compute
dtype and the ``torch.device``. Stages take a ``Source`` instead of re-reading ``config.json``.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .adapters import MoEAdapter, get_adapter
from .checkpoints import load_config, resolve_dtype
from .devices import resolve_device
from .errors import SecompressError

log = logging.getLogger(__name__)
# what a run needs from a hub repository: never pickled weights (.bin, .pt, .pth)
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def resolve_local(model_id: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The local folder of ``model_id``: the folder itself, or the hub snapshot (from the local cache when
    ``HF_HUB_OFFLINE`` is set; downloaded otherwise) holding its config, tokenizer and safetensors."""
    local = Path(model_id)
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise SecompressError(f"'{model_id}' has no config.json: is it a transformers checkpoint folder?")
        return local
    name = str(model_id)
    if name.startswith((".", "/")) or name.count("/") != 1:
        raise SecompressError(f"model path '{model_id}' does not exist (and is not a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = [*HUB_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline without a cached snapshot, gated, missing: one clear message
        raise SecompressError(f"could not get '{model_id}'{f' at revision {revision}' if revision else ''} from the "
                              f"Hugging Face Hub or its local cache ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "download it (huggingface-cli download) or pass a local folder") from None


@dataclass(frozen=True)
class Source:
    id: str  # as the user gave it: a local folder or a hub id
    path: Path  # the local folder (config, tokenizer, safetensors shards)
    config: object = field(repr=False)  # the transformers config, read once (do not change it: copy)
    adapter: MoEAdapter = field(repr=False)
    dtype: torch.dtype = torch.float32  # compute dtype
    device: torch.device = torch.device("cpu")
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def open(cls, model_id: str | Path, revision: str | None = None, trust_remote_code: bool = False,
             dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> "Source":
        """Resolve ``model_id`` and read its config once; raises before any weight is read (an unknown
        architecture, a missing folder, a hub id that is not cached offline, a GPU that is not there)."""
        path = resolve_local(model_id, revision, trust_remote_code)
        config = load_config(path, trust_remote_code=trust_remote_code)
        return cls(str(model_id), path, config, get_adapter(config), resolve_dtype(dtype, config),
                   resolve_device(device), revision, trust_remote_code)

    def with_(self, **changes) -> "Source":
        """The same source with another dtype, device, or config (e.g. a pruned skeleton's)."""
        import dataclasses

        if "device" in changes:
            changes["device"] = resolve_device(changes["device"])
        if "dtype" in changes:
            changes["dtype"] = resolve_dtype(changes["dtype"], self.config)
        return dataclasses.replace(self, **changes)

    def fresh_config(self):
        """A copy of the config a stage may change (pruning changes expert counts)."""
        return copy.deepcopy(self.config)

    @cached_property
    def checkpoint(self):
        """Random access to the shards' tensors (headers read once)."""
        from .streaming import Checkpoint

        return Checkpoint(self.path)

    def skeleton(self):
        """The model with every parameter on ``meta`` (a fresh one per call)."""
        from .streaming import build_skeleton

        return build_skeleton(self.fresh_config())

    def tokenizer(self):
        from .checkpoints import load_tokenizer

        return load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)

    def load(self):
        """The whole model in memory on the device (a resident source's model)."""
        from .checkpoints import load_model

        model = load_model(self.path, self.dtype, trust_remote_code=self.trust_remote_code,
                           device=None if self.device.type == "cpu" else str(self.device))
        model.name_or_path = self.id
        return model

    @property
    def is_local(self) -> bool:
        return Path(self.id).exists()

    @property
    def nbytes(self) -> int:
        """Bytes of the safetensors shards on disk."""
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))
