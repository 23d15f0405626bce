"""Do bitsandbytes exports load in transformers 4.x? (a compatibility check, not a test)

    python -m venv --system-site-packages /tmp/tf4 && /tmp/tf4/bin/pip install "transformers>=4.57,<5"
    python evals/check_bnb_transformers4.py --python /tmp/tf4/bin/python

For each architecture with a per-expert transformers-4 layout, a tiny bf16 model with a
planted Super Expert is quantized here (transformers 5, ``quantize_(..., method='bnb')``),
exported with ``save_quantized``, then loaded in the other interpreter with plain
``AutoModelForCausalLM.from_pretrained`` and run on the same ids. Prints the logits' largest
difference, whether the SE stayed ``nn.Linear`` and the other experts became bnb modules.
bitsandbytes 0.50 repacks 4-bit weights on AVX512-BF16 CPUs and fails for in_features < 64,
so the loading side turns that repacking off (a CPU-only bitsandbytes limit, not the file).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3")
SE = (1, 1)
LOADER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
out, se_l, se_e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = torch.load(out + '.pt')
m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, attn_implementation='eager', device_map='cpu')
for x in m.modules():
    if hasattr(x, 'support_avx512bf16_for_cpu'): x.support_avx512bf16_for_cpu = False
with torch.no_grad(): got = m(d['ids']).logits.float()
L = m.model.layers[se_l]
ex = (L.mlp if hasattr(L, 'mlp') else L.block_sparse_moe).experts
kind = lambda e: sorted({type(c).__name__ for c in ex[e].children() if 'Linear' in type(c).__name__})
print(json.dumps({'transformers': transformers.__version__, 'max_abs_diff': float((got - d['ref'].float()).abs().max()),
                  'logit_scale': float(d['ref'].float().abs().max()), 'se_modules': kind(se_e),
                  'other_expert_modules': kind(0)}))
"""


def export(arch: str, bits: int, out: Path) -> None:
    from secompress.checkpoints import load_model
    from secompress.quant.api import save_quantized
    from secompress.testing import make_tiny, plant_super_expert, save_tiny

    model = make_tiny(arch)
    plant_super_expert(model, *SE)
    model = load_model(save_tiny(model, out.parent / f"{out.name}-src"), dtype=torch.bfloat16)
    from secompress.adapters import get_adapter

    ad = get_adapter(model.config)
    layer = ad.moe_layer_indices(model)[0] if SE[0] not in ad.moe_layer_indices(model) else SE[0]
    from secompress.quant.plan import resolve_plan

    plan = resolve_plan(model, ses=[(layer, SE[1])], default=bits, meta={"method": "bnb"})
    from secompress.quant.bnb import apply_bnb

    apply_bnb(model, plan)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, None, plan, out)
    torch.save({"ids": ids, "ref": ref, "se_layer": layer}, str(out) + ".pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="an interpreter with transformers 4.x and bitsandbytes")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for bits in (4, 8):
            for arch in ARCHS:
                out = Path(d) / f"{arch}-{bits}"
                export(arch, bits, out)
                layer = torch.load(str(out) + ".pt")["se_layer"]
                res = subprocess.run([args.python, "-c", LOADER, str(out), str(layer), str(SE[1])],
                                     capture_output=True, text=True)
                row = {"arch": arch, "bits": bits}
                if res.returncode == 0:
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                else:
                    row["error"] = res.stderr.strip().splitlines()[-1][:300]
                rows.append(row)
                print(json.dumps(row))


if __name__ == "__main__":
    main()
