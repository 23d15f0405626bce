"""The profiling stage: find the Super Experts of an MoE checkpoint.

    result = profile("path/or/hub-id", data="builtin")           # in memory
    result = profile("path", config=ProfileConfig(streaming=True))  # one layer at a time
    save_profile(result, "out/")                                  # JSON, CSV, plots

Super Experts follow Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts
Large Language Models" (arXiv 2507.23279): see :class:`secompress.se_rule.SERule`.
Legend: L decoder layers, C = E routed experts + 1 shared-expert column.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .data import CalibrationData, load_calibration
from .errors import CalibrationError, SecompressError
from .instrument import Recorder, instrument
from .checkpoints import check_model
from .dtypes import DEFAULT_DTYPE, check_dtype
from .se_rule import SERule, find_super_experts, massive_ratio, se_evidence

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE = 32, 512, 8  # calibration defaults of every entry point


@dataclass(frozen=True)
class ProfileConfig:
    rule: SERule = SERule()
    num_samples: int = DEFAULT_NUM_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    streaming: bool = False
    dtype: str = DEFAULT_DTYPE  # "auto": the checkpoint's own dtype
    attention: bool = True  # measure attention-sink mass (needs eager attention)

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("num_samples and batch_size must be >= 1, seq_len >= 2")
        if not isinstance(self.rule, SERule):
            raise ValueError("rule must be a SERule")
        check_dtype(self.dtype)


@dataclass
class ProfileResult:
    model: str
    model_type: str
    num_experts: int
    moe_layers: list[int]
    has_shared: bool
    rule: SERule
    data_source: str
    data_sha256: str
    num_tokens: int
    arrays: dict[str, np.ndarray]  # name -> [L, C] (expert stats) or [L] (layer stats)
    super_experts: list[tuple[int, int]] = field(default_factory=list)  # (layer, column), absolute rule
    super_experts_normalised: list[tuple[int, int]] = field(default_factory=list)
    timestamp: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.arrays["hidden_max"])

    def expert_label(self, col: int) -> int | str:
        return "shared" if col == self.num_experts else int(col)

    def se_ids(self, normalised: bool = False) -> list[tuple[int, int | str]]:
        """[(layer, expert id or 'shared')] of the Super Experts."""
        ses = self.super_experts_normalised if normalised else self.super_experts
        return [(l, self.expert_label(c)) for l, c in ses]

    def evidence(self, normalised: bool = False):
        """How strongly the statistics support the SE verdict (:func:`~secompress.se_rule.se_evidence`)."""
        return se_evidence(self.arrays["out_max"], self.super_experts_normalised if normalised else
                           self.super_experts, self.massive_ratios())

    def massive_ratios(self) -> np.ndarray:  # [L]
        return np.array([massive_ratio(f, m) for f, m in
                         zip(self.arrays["hidden_first_max"], self.arrays["hidden_median"])])


def _arrays(rec: Recorder, num_layers: int, E: int, moe_layers: list[int], has_shared: bool) -> dict:
    C = E + 1
    out = {k: np.full((num_layers, C), np.nan) for k in
           ("out_max", "in_max", "gate_sum", "norm_sum", "gated_norm_sum")}
    out.update({k: np.full((num_layers, C), -1, dtype=np.int64) for k in ("out_channel", "out_pos", "tokens")})
    for l in moe_layers:
        st = rec.experts.get(l)
        cols = C if has_shared else E
        for k in out:
            out[k][l, :cols] = 0
            if st is not None:
                out[k][l, :cols] = getattr(st, k)[:cols].numpy()
        never = out["tokens"][l, :cols] == 0  # experts no token reached: no maxima to report
        for k in ("out_max", "in_max"):
            out[k][l, :cols][never] = 0.0
    for name, d in (("hidden_max", rec.hidden_max), ("hidden_first_max", rec.hidden_first_max)):
        out[name] = np.array([d.get(l, np.nan) for l in range(num_layers)])
    out["hidden_median"] = np.array([np.mean(rec.hidden_median[l]) if l in rec.hidden_median else np.nan
                                     for l in range(num_layers)])
    out["sink_mass"] = np.array([np.mean(rec.sink_mass[l]) if rec.sink_mass.get(l) else np.nan
                                 for l in range(num_layers)])
    return out


def _chunks(data: CalibrationData, batch_size: int) -> list[torch.Tensor]:
    return list(data.input_ids.split(batch_size))


def profile(model, tokenizer=None, data: str | Path | CalibrationData = "builtin",
            config: ProfileConfig = ProfileConfig(), revision: str | None = None,
            trust_remote_code: bool = False, progress: bool = True, device: str = "auto") -> ProfileResult:
    """Run calibration text through an MoE and identify its Super Experts.

    ``model`` is a checkpoint folder, a hub id, a :class:`~secompress.source.Source`, or an in-memory
    transformers model. One pass of the calibration windows over its layers (:mod:`secompress.pipeline`:
    the model in memory, or with ``config.streaming`` the checkpoint one materialised decoder layer at a
    time on ``device``) under the recording hooks of :func:`~secompress.instrument.instrument`. Per
    (layer, expert), shared experts included, it records the max |down_proj output| with its hidden
    channel and token position, the max |down_proj input|, routed-token counts and routing-weighted output
    norms; per layer, the max |hidden|, the max |hidden| at the first token, the median |hidden| and the
    attention mass on the first token. SEs are then found with the rule of Su et al. 2025 (arXiv
    2507.23279) and with its layer-normalised variant.
    """
    from .pipeline import LayerSource, Resident, Stream, Streamed, run_pass
    from .source import Source

    source = model if isinstance(model, Source) else None
    if isinstance(model, (str, Path)):
        source = Source.open(model, revision, trust_remote_code, config.dtype, device)
    if source is not None:
        name = source.id
        tokenizer = tokenizer or source.tokenizer()
    elif config.streaming:
        raise SecompressError("streaming mode needs a checkpoint path, not an in-memory model")
    else:
        name = getattr(model, "name_or_path", type(model).__name__)
    if tokenizer is None and not isinstance(data, CalibrationData):
        raise SecompressError("a tokenizer is needed to tokenize calibration text")
    calib = data if isinstance(data, CalibrationData) else \
        load_calibration(data, tokenizer, config.num_samples, config.seq_len)
    rec = Recorder(seq_len=calib.input_ids.shape[1])
    src: LayerSource
    if source is not None and config.streaming:
        src = Streamed(source)
    else:
        src = Resident(source.load() if source is not None else model)
    live, adapter = src.model, src.adapter
    model_type = str(getattr(live.config, "model_type"))
    E, moe_layers, L = adapter.num_experts(live.config), adapter.moe_layer_indices(live), len(src.layers)
    with _eager_attention(live, config.attention and src.resident), \
            instrument(live, src.adapter, rec, attention=config.attention):
        run_pass(src, {"calibration": Stream(_chunks(calib, config.batch_size), before=True)}, progress=progress,
                 desc="profile (streaming)" if not src.resident else "profile")
    has_shared = adapter.shared_expert is not None
    arrays = _arrays(rec, L, E, moe_layers, has_shared)  # (a streamed pass has dropped its layers by now)
    if not rec.experts:
        raise CalibrationError("no token reached any expert: is the calibration data empty?")
    return ProfileResult(
        model=str(name), model_type=model_type, num_experts=E, moe_layers=moe_layers,
        has_shared=has_shared, rule=config.rule, data_source=calib.source, data_sha256=calib.sha256,
        num_tokens=calib.num_tokens, arrays=arrays,
        super_experts=find_super_experts(arrays["out_max"], config.rule),
        super_experts_normalised=find_super_experts(arrays["out_max"], config.rule, normalise=True),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def check_profile_matches(profile: ProfileResult, model) -> None:
    """SecompressError unless ``profile`` was made on a model of ``model``'s type and shape."""
    adapter = check_model(model)
    E, L = adapter.num_experts(model.config), len(adapter.layers(model))
    if profile.model_type != model.config.model_type or profile.num_experts != E or profile.num_layers != L:
        hint = ""
        if profile.model_type == model.config.model_type and profile.num_layers == L and profile.num_experts > E:
            hint = ("; it was made before pruning: use the renumbered profile `secompress prune` wrote next to the "
                    "pruned checkpoint (its profile/ folder), or none to profile again")
        raise SecompressError(f"the profile is of a {profile.model_type} model with {profile.num_layers} layers "
                              f"x {profile.num_experts} experts, this model is {model.config.model_type} "
                              f"with {L} x {E}{hint}")


def profile_for(model, profile: ProfileResult | None = None, tokenizer=None,
                data: str | Path | CalibrationData = "builtin", config: ProfileConfig | None = None,
                progress: bool = False) -> ProfileResult:
    """The profile a stage uses for ``model``: ``profile`` checked against the model, or a new one.

    A new one is profiled on ``data`` (text: ``config``'s windows; CalibrationData: as given)
    with ``tokenizer``; the prune and quantize stages both come here.
    """
    if profile is not None:
        check_profile_matches(profile, model)
        return profile
    if tokenizer is None and not isinstance(data, CalibrationData):
        raise SecompressError("Super-Expert protection and bit allocation need a profile: pass profile= "
                              "(secompress.load_profile) or tokenizer= to profile now")
    config = config or ProfileConfig(num_samples=16, seq_len=256, batch_size=4)  # CalibrationData: as given
    return _profile(model, tokenizer, data=data, config=config, progress=progress)


_profile = profile  # profile_for's argument shadows the name


class _eager_attention:
    """Switch a model to eager attention (which returns probabilities) and back."""

    def __init__(self, model, on: bool):
        self.model, self.on = model, on

    def __enter__(self):
        self.prev = getattr(self.model.config, "_attn_implementation", None)
        if self.on and self.prev != "eager":
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        if self.on and self.prev not in (None, "eager"):
            self.model.set_attn_implementation(self.prev)
