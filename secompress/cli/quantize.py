"""``secompress quantize``: mixed-precision quantization that keeps Super Experts precise.

    secompress quantize MODEL --method rtn|gptq|bnb --bits 4 --group-size 32 --se-bits 16|8 [--se-mode expert|layer]
                        [--scheme FP8|FP8_DYNAMIC|FP8_BLOCK|W8A8|NVFP4|MXFP4|W4A16|... (compressed-tensors presets)]
                        [--avg-bits 3.5] [--profile DIR] [--rule NAME=BITS | re:REGEX=BITS ...]
                        [--calibration all-experts] [--option KEY=VALUE ...]
                        [--format compressed-tensors|dequantized] --out OUT [--overwrite]
"""
from __future__ import annotations

import argparse

from ..quant.backends import BACKENDS, FORMATS
from ..quant.config import CALIBRATIONS
from ..quant.formats.base import SCALE_DTYPES
from ..quant.coverage import FALLBACKS
from ..quant.plan import SE_MODES
from ..quant.schemes import SUPPORTED
from .args import add_command, add_profile_arg, add_protection, model_parent, output_parent


def _add(sub) -> None:
    p = add_command(sub, "quantize", "quantize weights, keeping Super Experts at higher precision",
                    parents=(model_parent(), output_parent()))
    p.add_argument("--method", default="rtn", choices=list(BACKENDS), help="quantization backend")
    p.add_argument("--scheme", default=None, metavar="|".join(SUPPORTED),
                   help="a compressed-tensors preset: weights and activations as vLLM / SGLang serve them (sets bits "
                        "and group size; FP8 / NVFP4 / ... with --method rtn, W4A16 / W8A16 also with gptq); the "
                        "Super Experts' layers stay 16-bit (--se-bits 8: FP8_DYNAMIC / W8A8)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="default bits per weight")
    p.add_argument("--group-size", type=int, default=128, help="input features per scale (-1: per row)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric quantization (zero point fixed mid-range, as the serving engines expect); "
                        "--no-symmetric stores a zero point per group")
    p.add_argument("--se-bits", "--se-precision", dest="se_bits", type=int, default=16, choices=[16, 8],
                   help="bits of the Super Experts (16 keeps them unquantized)")
    p.add_argument("--se-mode", default=None, choices=list(SE_MODES),
                   help="raise only the SEs, or every expert of an SE's layer (one format per layer, vLLM); "
                        "default: layer for the compressed-tensors export, else expert")
    p.add_argument("--format", default=None, choices=list(dict.fromkeys(
                       [*FORMATS, *(b.own_format for b in BACKENDS.values() if b.own_format)])),
                   help="export format of rtn/gptq results (default compressed-tensors: vLLM, SGLang, transformers; "
                        "dequantized: 16-bit weights + codes; "
                        "recipe: export.format)")
    p.add_argument("--scale-dtype", default="model", choices=list(SCALE_DTYPES),
                   help="compressed-tensors' weight scales on disk: model (the export's 16-bit dtype, what vLLM "
                        "computes with) or float32 (the exact scales; about 10%% bigger at group size 32)")
    add_protection(p, "quantized like the rest")
    p.add_argument("--avg-bits", type=float, default=None, help="allocate routed experts' bits to this average")
    p.add_argument("--rule", action="append", default=[], help="NAME=BITS or re:REGEX=BITS (16 keeps); repeatable")
    p.add_argument("--fallback", default=None, choices=[f for f in FALLBACKS if f],
                   help="calibrated methods: quantize experts no calibration token reached this way")
    p.add_argument("--calibration", default="routed", choices=list(CALIBRATIONS),
                   help="calibrated methods: 'all-experts' shows every calibration token to every expert")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method's backend, e.g. quant_type=fp4 for bnb (repeatable)")
    add_profile_arg(p)
    p.add_argument("--streaming", action="store_true",
                   help="one decoder layer at a time from the checkpoint's shards (models larger than memory)")


def backend_options(method: str, pairs: list[str], scheme: str | None = None):
    """The backend's options dataclass from ``KEY=VALUE`` strings (values read as YAML scalars); the backend
    is the one making ``scheme`` with ``method`` when a scheme is given."""
    import dataclasses

    import yaml

    from ..quant.config import backend_for

    cls = backend_for(method, scheme).options
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--option {pair!r}: method '{method}'{f' with scheme {scheme}' if scheme else ''} takes "
                             f"{', '.join(f'{n}=VALUE' for n in names) or 'no options'}")
        kw[key] = yaml.safe_load(value)
    return cls(**kw)


def _run(args) -> int:
    from ..quant.config import QuantConfig
    from ..quant.plan import Rule
    from .job import compress_command

    cfg = QuantConfig(bits=args.bits, group_size=None if args.group_size == -1 else args.group_size,
                      symmetric=args.symmetric, scale_dtype=args.scale_dtype, se_mode=args.se_mode, se_bits=args.se_bits,
                      protect_super_experts=args.protect_super_experts, rules=tuple(Rule.parse(r) for r in args.rule),
                      avg_bits=args.avg_bits, method=args.method,
                      options=backend_options(args.method, args.option, args.scheme),
                      fallback=args.fallback, calibration=args.calibration, format=args.format, scheme=args.scheme)
    cfg.require()
    return compress_command(args, quant_cfg=cfg)


COMMAND = (_add, _run)
