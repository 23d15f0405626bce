"""``secompress quantize``: mixed-precision quantization that keeps Super Experts precise.

    secompress quantize MODEL --method rtn|bnb|gptq --bits 4 --group-size 32 --se-precision 16|8 [--se-mode expert|layer]
                        [--avg-bits 3.5] [--profile DIR] [--rule NAME=BITS | re:REGEX=BITS ...] --out OUT [--overwrite]
"""
from __future__ import annotations

from .api import METHODS


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize weights, keeping Super Experts at higher precision")
    p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--method", default="rtn", choices=list(METHODS))
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="default bits per weight")
    p.add_argument("--group-size", type=int, default=128, help="input features per scale (-1: per row)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--se-precision", type=int, default=16, choices=[16, 8], help="bits of the Super Experts")
    p.add_argument("--se-mode", default=None, choices=["expert", "layer"],
                   help="raise only the SEs, or every expert of an SE's layer (one format per layer, vLLM); "
                        "default: layer for the compressed-tensors export, else expert")
    p.add_argument("--format", default=None, choices=["compressed-tensors", "dequantized", "gptqmodel"],
                   help="export of rtn/gptq results (default compressed-tensors: vLLM, SGLang, transformers; "
                        "dequantized: 16-bit weights + codes; gptqmodel: gptqmodel's own folder, gptq only)")
    p.add_argument("--no-se-protection", action="store_true", help="quantize Super Experts like the rest")
    p.add_argument("--avg-bits", type=float, default=None, help="allocate routed experts' bits to this average")
    p.add_argument("--rule", action="append", default=[], help="NAME=BITS or re:REGEX=BITS (16 keeps); repeatable")
    p.add_argument("--bnb-quant-type", default="nf4", choices=["nf4", "fp4"], help="method bnb, 4-bit: the format")
    p.add_argument("--fallback", default=None, choices=["rtn"], help="for experts no calibration token reached")
    p.add_argument("--profile", default=None, help="a profile directory from `secompress profile` (else profile now)")
    p.add_argument("--data", default="builtin", help="calibration text when profiling now")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")


def _quantize(args) -> int:
    from ..checkpoints import load_model, load_tokenizer
    from ..outputs import check_output_dir
    from ..profile import DTYPES
    from ..profile_io import load_profile
    from .api import QuantConfig, check_method, quantize_, save_quantized
    from .compressed_tensors import resolve_export
    from .plan import Rule

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data))  # fail before any compute
    fmt, se_mode = resolve_export(args.format, args.method, args.se_mode, protect=not args.no_se_protection)
    cfg = QuantConfig(bits=args.bits, group_size=None if args.group_size == -1 else args.group_size,
                      symmetric=args.symmetric, se_mode=se_mode,
                      se_bits=None if args.se_precision == 16 else 8, protect_super_experts=not args.no_se_protection,
                      rules=tuple(Rule.parse(r) for r in args.rule), avg_bits=args.avg_bits, method=args.method,
                      fallback=args.fallback, bnb_quant_type=args.bnb_quant_type)
    check_method(cfg.method)
    prof = load_profile(args.profile) if args.profile else None
    model = load_model(args.model, DTYPES[args.dtype], args.revision, args.trust_remote_code)
    tok = load_tokenizer(args.model, args.revision, args.trust_remote_code)
    if cfg.method == "gptq":  # gptqmodel quantizes from the checkpoint, following our plan
        from ..data import load_calibration
        from .api import plan_quantization
        from .gptq import gptq_, gptq_quantize

        from ..profile import ProfileConfig, profile as run_profile
        from .coverage import check_coverage

        calib = load_calibration(args.data, tok, num_samples=32, seq_len=512)
        prof = prof or run_profile(model, tok, data=calib, config=ProfileConfig(num_samples=32, seq_len=512))
        check_coverage(prof, cfg.fallback)  # an expert without tokens is an error unless --fallback rtn
        if fmt != "gptqmodel":  # GPTQ codes read back into the model, then written as fmt
            import tempfile
            from pathlib import Path

            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".gptq-work-", dir=Path(args.out).parent) as work:
                plan, _ = gptq_(model, tok, cfg, prof, calib, work)
            return _save(model, tok, plan, fmt, args)
        plan = plan_quantization(model, cfg, profile=prof)
        calib = calib.input_ids
        del model
        gptq_quantize(args.model, tok, plan, calib, args.out, bits=cfg.bits, group_size=cfg.group_size,
                      symmetric=cfg.symmetric, overwrite=args.overwrite, fallback=cfg.fallback)
        print(plan.table())
        print(f"wrote {args.out} (GPTQ checkpoint: load it with GPTQModel.load or vLLM)")
        return 0
    plan = quantize_(model, cfg, profile=prof, tokenizer=tok, data=args.data)
    return _save(model, tok, plan, fmt, args)


def _save(model, tok, plan, fmt, args) -> int:
    from .api import save_quantized
    from .compressed_tensors import FORMAT, report, save_ct

    if fmt == FORMAT:
        save_ct(model, tok, plan, args.out, overwrite=args.overwrite)
        print(plan.table(with_compatibility=False))
        print(f"wrote {args.out} (compressed-tensors pack-quantized; load with secompress.load, vLLM, SGLang or "
              "transformers as the report says):")
        import json
        from pathlib import Path

        from .api import PLAN_NAME

        compat = json.loads((Path(args.out) / PLAN_NAME).read_text())["compatibility"]
        print(report({k: (v["ok"], v["why"]) for k, v in compat.items()}))
        return 0
    save_quantized(model, tok, plan, args.out, overwrite=args.overwrite)
    print(plan.table())
    what = {"rtn": "dequantized safetensors, quantization_plan.json, secompress_quant.safetensors",
            "gptq": "dequantized safetensors, quantization_plan.json, secompress_quant.safetensors",
            "bnb": "bitsandbytes safetensors in the per-expert layout: load with secompress.load"}[
        plan.meta.get("method", "rtn")]
    print(f"wrote {args.out} ({what})")
    return 0


COMMAND = (_add_quantize, _quantize)  # the entry of secompress.cli.COMMANDS
