"""llm-compressor 0.14's exports of the reference model, and what transformers 5.17 makes of checkpoints.

    PYTHONPATH=. /work/venvs/llmc/bin/python evals/peer/export_reference.py export OUT_DIR
    PYTHONPATH=. /work/venvs/llmc/bin/python evals/peer/export_reference.py logits IDS.pt OUT.json DIR...

Run with llm-compressor's own environment (llm-compressor 0.14, transformers 5.17, compressed-tensors
0.19); evals/check_peer_exports.py calls it. ``export`` writes, from evals/reference/model (bf16):

  llmc-rtn-w4g128              QuantizationModifier, int4 symmetric, group 128, every Linear but lm_head and routers
  llmc-gptq-w4g128-actorder    GPTQModifier, the same scheme, actorder: weight (16 windows of 256 bytes of the
                               reference corpus's training split, <bos> first)
  llmc-ignore-layer0           as llmc-rtn-w4g128 with layer 0's experts (the Super Expert's) in `ignore`
  llmc-gidx-w4g128-asym        an asymmetric RTN export rewritten into the act-order "group" layout with
                               weight_g_idx (make_fixtures.to_act_order: llm-compressor 0.14 no longer writes it)

``logits`` loads the original and each DIR with ``AutoModelForCausalLM.from_pretrained`` (transformers
5.17's own compressed-tensors integration) and writes, per DIR, the relative error of its logits on
the ids in IDS.pt against the original's, or the error it raised.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "evals" / "reference")]
REFERENCE = ROOT / "evals" / "reference" / "model"
ROUTERS = "re:.*mlp\\.gate$"


def calibration_ids(n: int = 16, seq: int = 256) -> torch.Tensor:
    from corpus import load_corpus

    from secompress.bytetok import BOS_ID

    train = load_corpus().train
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - seq, (n,), generator=g)
    return torch.stack([torch.cat([torch.tensor([BOS_ID]), train[s: s + seq - 1].long()]) for s in starts.tolist()])


def export_all(out: Path) -> None:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from make_fixtures import export, scheme, to_act_order

    out.mkdir(parents=True, exist_ok=True)
    ignore = ["lm_head", ROUTERS]
    runs = {
        "llmc-rtn-w4g128": QuantizationModifier(config_groups={"g": scheme(4, group=128)}, ignore=ignore),
        "llmc-gptq-w4g128-actorder": GPTQModifier(config_groups={"g": scheme(4, group=128, actorder="weight")},
                                                  ignore=ignore),
        "llmc-ignore-layer0": QuantizationModifier(config_groups={"g": scheme(4, group=128)},
                                                   ignore=[*ignore, "re:model\\.layers\\.0\\.mlp\\.experts\\..*"]),
        "tmp-asym": QuantizationModifier(config_groups={"g": scheme(4, symmetric=False, group=128)}, ignore=ignore),
    }
    calib = calibration_ids()
    for name, mod in runs.items():
        if (out / name).exists():
            shutil.rmtree(out / name)
        export(REFERENCE, out / name, mod, calib)
    if (out / "llmc-gidx-w4g128-asym").exists():
        shutil.rmtree(out / "llmc-gidx-w4g128-asym")
    to_act_order(out / "tmp-asym", out / "llmc-gidx-w4g128-asym", REFERENCE, group_size=128)
    shutil.rmtree(out / "tmp-asym")


@torch.no_grad()
def logits_report(ids_file: Path, out: Path, dirs: list[str]) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    ids = torch.load(ids_file)
    ref = AutoModelForCausalLM.from_pretrained(REFERENCE).eval()(input_ids=ids).logits.float()
    res = {"transformers": transformers.__version__}
    for d in dirs:
        try:
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            lg = model(input_ids=ids).logits.float()
            res[Path(d).name] = {"rel_err": float((lg - ref).norm() / ref.norm())}
        except Exception as e:  # recorded, not raised: which checkpoints this release cannot load
            res[Path(d).name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export_all(Path(sys.argv[2]))
    elif sys.argv[1] == "logits":
        logits_report(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        raise SystemExit(__doc__)
