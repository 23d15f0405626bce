"""Train the reference MoE: a small Qwen3-MoE on the Python standard library's source.

Deterministic and resumable: the initial weights come from ``--seed``, batch ``s``
is drawn from a generator seeded with ``(seed, s)``, and a checkpoint (weights,
optimizer, step) is written atomically every ``--ckpt-every`` steps. Re-running the
same command continues from the last checkpoint.

    python evals/reference/train.py --run evals/reference/runs/main --steps 6000

Choices that make attention sinks and massive activations emerge (Gu et al. 2024,
"When Attention Sink Emerges in Language Models"; Sun et al. 2024, "Massive
Activations in Large Language Models"): a BOS token at every sequence start, a
fairly high peak learning rate, weight decay 0.1, and as many tokens as the time
allows. No weight is ever edited by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import load_corpus  # noqa: E402

from secompress.bytetok import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE  # noqa: E402


def make_config():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=1024, router_aux_loss_coef=0.01, output_router_logits=True,
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return cfg


def batch(stream: torch.Tensor, seed: int, step: int, B: int, T: int) -> torch.Tensor:
    """[B, T] windows of the byte stream, each prefixed by BOS. Depends only on (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - T, (B,), generator=g)
    rows = [torch.cat([torch.tensor([BOS_ID]), stream[s : s + T - 1].long()]) for s in starts.tolist()]
    return torch.stack(rows)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def probe(model, val: torch.Tensor) -> dict:
    """Held-out loss and the first-token massive-activation ratio per layer."""
    model.eval()
    out = model(input_ids=val, labels=val, output_hidden_states=True)
    ratios = []
    for h in out.hidden_states[1:]:  # [B, T, H] after each layer
        first = h[:, 0].abs().amax().item()
        ratios.append(round(first / h.abs().median().item(), 1))
    model.train()
    return {"val_loss": round(out.loss.item(), 4), "first_token_ratio": ratios}


def save_ckpt(run: Path, model, opt, step: int, meta: dict) -> None:
    tmp = run / "ckpt.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp / "model.safetensors")  # lm_head is tied to embed_tokens
    torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    final = run / "ckpt"
    old = run / "ckpt.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--probe-every", type=int, default=500)
    args = ap.parse_args()

    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = load_corpus()
    print(f"corpus sha256={corpus.sha256} files={corpus.n_files} train={len(corpus.train)} "
          f"heldout={len(corpus.heldout)} bytes", flush=True)
    cfg = make_config()
    cfg._experts_implementation = "grouped_mm"
    model = Qwen3MoeForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95))
    args.run.mkdir(parents=True, exist_ok=True)
    start = 0
    if (args.run / "ckpt" / "state.json").exists():
        model.load_state_dict(load_file(args.run / "ckpt" / "model.safetensors"), strict=False)
        model.tie_weights()
        opt.load_state_dict(torch.load(args.run / "ckpt" / "optim.pt", weights_only=True))
        start = json.loads((args.run / "ckpt" / "state.json").read_text())["step"]
        print(f"resumed at step {start}", flush=True)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "corpus_sha256": corpus.sha256}
    val = torch.stack([torch.cat([torch.tensor([BOS_ID]), corpus.heldout[i : i + args.seq - 1].long()])
                       for i in range(0, 16 * args.seq, args.seq)])
    log = open(args.run / "log.jsonl", "a")
    model.train()
    t0 = time.time()
    for step in range(start, args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(corpus.train, args.seed, step, args.batch, args.seq)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": round(out.loss.item(), 4), "lr": lr, "sec": round(time.time() - t0)}
        if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            rec.update(probe(model, val))
        if (step + 1) % 50 == 0 or "val_loss" in rec:
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_ckpt(args.run, model, opt, step + 1, meta)
    cfg._experts_implementation = None
    model.config.output_router_logits = False
    model.save_pretrained(args.run / "final")
    print("done", flush=True)


if __name__ == "__main__":
    main()
