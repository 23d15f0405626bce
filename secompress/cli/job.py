"""What ``prune`` and ``quantize`` share: one compress job (:mod:`secompress.compress`) over the model in
memory, or with ``--streaming`` over its shards one decoder layer at a time, then the export."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..errors import option_style


def compress_command(args, prune_cfg=None, quant_cfg=None) -> int:
    """Profile (unless --profile), plan, one pass, export; prints the plan, the tables and what was written."""
    from ..checkpoints import check_finite_weights
    from ..compress import Job, plan_job, run_job
    from ..data import CalibrationData, load_calibration
    from ..outputs import check_output_dir, checkpoint_bytes, export_size
    from ..pipeline import Resident, Streamed
    from ..quant.formats import FORMATS
    from ..recipe.publish import command_card
    from ..profile import ProfileConfig, profile
    from ..profile_io import PROFILE_DIR, write_profile
    from ..prune.result import REPORT_NAME, remap_profile, summary_table
    from .args import check_calibration_args, load_profile_arg, open_source

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.data),  # fail before any compute
                     need_bytes=checkpoint_bytes(args.model))
    check_calibration_args(args)
    source = open_source(args)
    job = Job(prune=prune_cfg, quant=quant_cfg, batch_size=args.batch_size)
    if prune_cfg is not None:  # a ratio the router (or the expert width) cannot take fails before any pass
        prune_cfg.prune_method.target(source.skeleton(), prune_cfg)
    if quant_cfg is not None:  # a scheme the shapes or the checkpoint's own quantization refuse: before any load
        for note in quant_cfg.check_model(source.skeleton(), source.config):
            print(f"note: {note}")
    prof = load_profile_arg(args.profile)
    if prof is None and (source.path / PROFILE_DIR / "super_experts.json").is_file():
        from ..profile_io import load_profile

        prof = load_profile(source.path / PROFILE_DIR)  # written by `secompress prune` for this very checkpoint
        print(f"using the Super-Expert profile stored with the checkpoint ({source.path / PROFILE_DIR})")
    tok = source.tokenizer()
    n_eval = getattr(args, "eval_samples", 0) if prune_cfg is not None else 0
    eval_data = getattr(args, "eval_data", None)
    both = load_calibration(args.data, tok, args.num_samples + (n_eval if eval_data is None else 0), args.seq_len)
    calib = CalibrationData(both.input_ids[:args.num_samples], both.source, both.sha256)
    if prune_cfg is not None:  # e.g. task data too short for a task method: before the profile
        prune_cfg.prune_method.check_data(prune_cfg, calib.num_tokens, calib.source)
    eval_ids = None
    if n_eval:
        eval_ids = both.input_ids[args.num_samples:] if eval_data is None else \
            load_calibration(eval_data, tok, n_eval, args.seq_len).input_ids
    model = None
    if not args.streaming:
        model = source.load()
        check_finite_weights(model, args.model)
    if prof is None:
        cfg = ProfileConfig(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                            streaming=args.streaming, dtype=args.dtype)
        prof = profile(source if args.streaming else model, tok, data=calib, config=cfg)
    with option_style("cli"):
        plan = plan_job(source, job, prof, calib=calib.input_ids)
    print(plan.describe(*(eval_ids.shape if eval_ids is not None else (0, 0)), streamed=args.streaming))

    def side(res, folder) -> None:
        """The prune report, the profile renumbered for the pruned model (``quantize`` finds it there) and
        the model card (``secompress push`` uploads the folder as it is)."""
        pr = res.prune_result(prof, calib.source, model_name=str(args.model))
        if pr is not None:
            (folder / REPORT_NAME).write_text(json.dumps(pr.to_json(), indent=2) + "\n")
            write_profile(remap_profile(prof, pr), folder / PROFILE_DIR, plots=False)
        qp = plan.quant_plan
        info = None if pr is None else {"method": pr.config.method, "num_experts_after": pr.num_experts_after,
                                        "removed_per_layer": pr.num_experts_before - pr.num_experts_after,
                                        "kept": pr.kept}
        command = "secompress " + " ".join(shlex.quote(a) for a in args.argv)
        card = command_card(str(args.model), Path(args.out).name, command, prof.se_ids(),
                            qp.table() if qp is not None else None, info, FORMATS[plan.job.format].load_snippet,
                            export_size(folder, source.nbytes), prof.evidence().why)
        (folder / "README.md").write_text(card)

    src = Streamed(source) if args.streaming else Resident(model)
    with option_style("cli"):
        res = run_job(plan, src, eval_ids, args.out, tok, overwrite=args.overwrite, finish=side)
    pr = res.prune_result(prof, calib.source, model_name=str(args.model))
    if pr is not None:
        print(summary_table(pr))
    if plan.quant_plan is not None:
        print(plan.quant_plan.table())
    if res.loss_before is not None and pr is None:
        print(f"held-out perplexity {res.perplexity_before:.3f} -> {res.perplexity_after:.3f}")
    where = f"streamed layer by layer on {source.device}" if args.streaming else f"in memory on {source.device}"
    size = export_size(args.out, source.nbytes)
    print(f"wrote {args.out} ({where}): {size['bytes'] / 2**20:.1f} MiB in {size['files']} files, {size['ratio']:.2f}x "
          f"the checkpoint's {size['source_bytes'] / 2**20:.1f} MiB; load it with secompress.load")
    return 0
