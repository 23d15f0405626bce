"""Errors a user can act on. Each message says what was wrong and what to do."""
from __future__ import annotations


class SecompressError(Exception):
    """Base class: every error secompress raises on purpose."""


class UnsupportedModelError(SecompressError):
    """The checkpoint's architecture has no adapter, or it has no MoE layer."""


class CalibrationError(SecompressError):
    """Calibration data is missing, empty, or produced non-finite activations."""


class OutputExistsError(SecompressError):
    """The output directory exists and ``overwrite`` was not asked for."""


class MissingExtraError(SecompressError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the optional package '{package}', which is not installed. "
            f"Install it with: pip install 'secompress[{extra}]'"
        )


def require(module: str, extra: str, what: str):
    """Import an optional module or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # only the missing package itself, not errors inside it
        if e.name and e.name.split(".")[0] == module.split(".")[0]:
            raise MissingExtraError(module, extra, what) from None
        raise


# ---- advice spelled the way the user gave the setting ---------------------------------------
_STYLE: list[str] = ["api"]  # innermost last: "api" | "cli" | "recipe"


class option_style:
    """Within the block, :func:`option` spells settings as CLI flags or recipe keys (default: Python)."""

    def __init__(self, style: str):
        if style not in ("api", "cli", "recipe"):
            raise ValueError(f"style must be api, cli or recipe, got {style!r}")
        self.style = style

    def __enter__(self):
        _STYLE.append(self.style)
        return self

    def __exit__(self, *exc):
        _STYLE.pop()


def option(key: str, value, stage: str = "quantize") -> str:
    """``key`` set to ``value`` as the user types it: ``--fallback rtn``, ``stages.quantize.fallback: rtn``
    or ``fallback='rtn'``."""
    style = _STYLE[-1]
    if style == "cli":
        return f"--{key.replace('_', '-')} {value}"
    if style == "recipe":
        return f"stages.{stage}.{key}: {value}"
    return f"{key}={value!r}"


class OutputWriteError(SecompressError):
    """The output cannot be written there: a file where a folder must be, read-only, disk full."""


class CheckpointError(SecompressError):
    """The checkpoint's files are unreadable: truncated or corrupt safetensors, a missing shard, NaN weights."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception by the CLI so that every ``with`` block cleans up."""


class SinkHealthError(SecompressError):
    """The compressed model lost its massive activation or its attention sink."""


class UnsupportedQuantizationError(SecompressError):
    """The checkpoint is quantized in a way secompress cannot read back to real weights."""


class RecoveryError(SecompressError):
    """The compressed model recovered less than the recipe's threshold of some metric."""


class PushError(SecompressError):
    """The upload failed; the export stays on disk."""


class RecipeError(SecompressError):
    """A recipe that does not match the schema; the message points at the line and key."""
