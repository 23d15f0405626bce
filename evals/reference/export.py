"""Export a training run as the shipped reference model, measure it, and write its model card.

    python evals/reference/export.py --run evals/reference/runs/main --out evals/reference/model

Writes bf16 safetensors + the byte tokenizer (atomically), then runs accept.py on the
exported files (so the figures are those of what ships) and writes figures.json and a
README.md model card next to the weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
from accept import accept  # noqa: E402
from corpus import load_corpus  # noqa: E402
from train import make_config  # noqa: E402

from secompress.bytetok import build_byte_tokenizer  # noqa: E402
from secompress.outputs import atomic_dir  # noqa: E402

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [moe, qwen3_moe, super-experts, secompress, reference-model]
---
# secompress reference MoE ({params:.1f} M parameters)

A small Qwen3-MoE trained from scratch on CPU by `evals/reference/train.py`, so that the
Super-Expert phenomenon (Su et al. 2025, arXiv 2507.23279) can be measured on a model
that ships with the project. No weight was edited by hand.

| | |
|---|---|
| architecture | Qwen3-MoE: {layers} layers, hidden {hidden}, {experts} experts (top-{topk}), expert FFN {moe_ffn} |
| tokenizer | bytes (ids 0-255) + `<bos>` `<eos>` `<pad>`; `<bos>` starts every sequence |
| corpus | CPython {pyver} standard library `*.py` ({n_files} files, sha256 `{sha}`), ~2% of files held out by path hash |
| training | {steps} steps x {batch} x {seq} bytes = {tokens:.1f} M bytes, AdamW lr {lr} cosine, wd {wd}, seed {seed} |
| held-out loss | {loss:.4f} nats/byte |

## Measured figures (evals/reference/accept.py, on these bf16 weights)

| figure | value | goal |
|---|---|---|
| max first-token massive-activation ratio (max \\|h\\| at token 0 / median \\|h\\|) | {max_ratio}x (per layer: {ratios}) | >= 100x |
| Super Experts, paper's rule | {ses} | >= 1 |
| Super Experts, layer-normalised rule | {ses_norm} | |
| loss increase, SEs zeroed | {d_se} | |
| loss increase, as many random non-SE experts zeroed (mean of {draws}) | {d_rand} | |
| ablation ratio | {abl} | >= 3x |
| attention mass on token 0, baseline -> SEs zeroed | {sink_b} -> {sink_s} | falls |

Pass: {passed}

The massive activation is written on the `<bos>` token by the Super Expert in layer 0 and
carried through the residual stream (ratio per layer above). Attention sinks are weak in
absolute terms in a model this small (a few % of each query's attention on token 0), but
zeroing the SE removes half to four fifths of it in layers 1-4.

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("evals/reference/model")
tok = AutoTokenizer.from_pretrained("evals/reference/model")
```

## Limitations
A 10 M-parameter byte-level model of Python source: useful to test compression code and to
measure the SE phenomenon, not as a language model.
"""


def _fmt(x, nd=4):
    return "n/a" if x is None else (f"{x:+.{nd}f}" if isinstance(x, float) else str(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=HERE / "model")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args()

    from transformers import Qwen3MoeForCausalLM

    state = json.loads((args.run / "ckpt" / "state.json").read_text())
    cfg = make_config()
    cfg.output_router_logits = False
    model = Qwen3MoeForCausalLM(cfg)
    model.load_state_dict(load_file(args.run / "ckpt" / "model.safetensors"), strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        build_byte_tokenizer().save_pretrained(tmp)
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
    fig = accept(str(args.out), draws=args.draws)
    (args.out / "figures.json").write_text(json.dumps(fig, indent=1))
    a = {k: state["args"][k] for k in ("batch", "seq", "lr", "wd", "seed")}
    corpus = load_corpus()
    card = CARD.format(
        params=sum(p.numel() for p in model.parameters()) / 1e6, layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, experts=cfg.num_experts, topk=cfg.num_experts_per_tok,
        moe_ffn=cfg.moe_intermediate_size, pyver=sys.version.split()[0], n_files=corpus.n_files,
        sha=corpus.sha256[:16], steps=state["step"], tokens=state["step"] * int(a["batch"]) * int(a["seq"]) / 1e6,
        loss=fig["heldout_loss_nats_per_byte"], max_ratio=fig["max_massive_ratio"],
        ratios=", ".join(str(r) for r in fig["massive_ratio_per_layer"]),
        ses=fig["super_experts_paper_rule"] or "none", ses_norm=fig["super_experts_layer_normalised"] or "none",
        d_se=_fmt(fig.get("loss_increase_se")), d_rand=_fmt(fig.get("loss_increase_random_mean")),
        draws=args.draws, abl="n/a" if fig.get("ablation_ratio") is None else f"{fig['ablation_ratio']:.1f}x",
        sink_b=fig.get("sink_mass_baseline"), sink_s=fig.get("sink_mass_se_zeroed"),
        passed=", ".join(f"{k}={v}" for k, v in fig["pass"].items()), **a)
    (args.out / "README.md").write_text(card)
    print(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
