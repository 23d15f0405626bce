"""Write tests/fixtures/peer/: small compressed-tensors checkpoints made by llm-compressor 0.14.

    PYTHONPATH=. /work/venvs/llmc/bin/python evals/peer/make_fixtures.py [--out tests/fixtures/peer]

Run it with llm-compressor's own environment (llm-compressor 0.14, transformers 5.17,
compressed-tensors 0.19), never as a dependency of secompress. It builds the source models with
``secompress.testing`` (the tiny configs with hidden size 32, 4 experts, 2 decoder layers, bfloat16, a Super Expert
planted at layer 0 expert 3), saves them under ``original-<arch>/``, and writes:

| folder | how | what it exercises |
|---|---|---|
| ``rtn-w4g16`` | ``QuantizationModifier``, int4 symmetric, group 16, every Linear but lm_head and the routers | pack-quantized, one ``Linear`` group |
| ``gptq-w4g16-actorder`` | ``GPTQModifier``, the same scheme, ``actorder: weight`` (llm-compressor 0.14's act-order) | GPTQ codes, act-order without g_idx |
| ``gidx-w4g16-asym`` | llm-compressor's asymmetric RTN export rewritten into the act-order "group" layout (see below) | ``weight_g_idx``, ``actorder: group``, zero points |
| ``rtn-w4g16-asym`` | ``QuantizationModifier``, int4 asymmetric, group 16 | packed zero points |
| ``ignore-layer`` | as ``rtn-w4g16``, ``ignore`` adds ``re:model\\.layers\\.0\\.mlp\\.experts\\..*`` | a whole MoE layer's experts 16-bit (the SE's) |
| ``ignore-modules-w8`` | ``ignore`` names the Super Expert's down_proj and one attention projection; an int8 channel group names layer 1's attention by regex; int4 for the rest | explicit per-module ignore, two groups |
| ``qwen2-rtn-w4g16`` | Qwen2-MoE (a shared expert, its gate ignored), int4 symmetric group 16 | shared experts |

llm-compressor 0.14 no longer writes act-order "group" (compressed-tensors 0.19: "removed
2026/08/27"), but checkpoints made before carry ``weight_g_idx`` and ``actorder: group`` and vLLM
still serves them. ``gidx-w4g16-asym`` is written in that layout: each packed weight's columns are
ordered by decreasing column norm (act-order orders by the Hessian diagonal; the layout is the
same), column ``j`` belongs to group ``g_idx[j] = rank(j) // 16``, each (row, group) gets
compressed-tensors' own asymmetric min-max scale and zero point (``calculate_qparams``) and codes
(``quantize``) over its columns, packed with compressed-tensors' ``pack_to_int32``.

``logits.safetensors`` holds the evaluation ids (``ids`` [2, 16]) and the originals' logits
(``original/<arch>``, float32 compute). ``manifest.json`` records the versions used and, per export,
what transformers 5.17 with compressed-tensors 0.19 makes of it: the relative error
``||logits - original|| / ||original||`` after ``AutoModelForCausalLM.from_pretrained(export)``,
or the error it raises.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GS = 16
SE = (0, 3)  # layer 0: with 2 layers, the SE rule looks at the first only (layer_fraction 0.75)
SMALL = dict(num_hidden_layers=2, tie_word_embeddings=False, hidden_size=32, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, num_experts=4)  # a few hundred KB for all the fixtures
SHARED = dict(shared_expert_intermediate_size=32)
ROUTERS = "re:.*mlp\\.gate$"


def scheme(bits: int, symmetric: bool = True, group: int | None = GS, actorder=None, targets=("Linear",)) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": symmetric,
         "strategy": "group" if group else "channel", "group_size": group}
    if actorder:
        w["actorder"] = actorder
    return {"targets": list(targets), "weights": w}


def originals(out: Path) -> dict[str, Path]:
    from secompress.testing import make_tiny, plant_super_expert, save_tiny

    paths = {}
    for arch in ("qwen3_moe", "qwen2_moe"):
        m = make_tiny(arch, **SMALL, **(SHARED if arch == "qwen2_moe" else {}))
        plant_super_expert(m, *SE)
        paths[arch] = save_tiny(m.to(torch.bfloat16), out / f"original-{arch}")
    return paths


def calibration(ids: torch.Tensor | None = None):
    """llm-compressor's calibration set: ``ids`` [N, S] (default 16 random byte windows of 64)."""
    from datasets import Dataset

    if ids is None:
        ids = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))  # [N, S]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def export(src: Path, dst: Path, modifier, calib: torch.Tensor | None = None) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    kw = {}
    if type(modifier).__name__ == "GPTQModifier":
        ds = calibration(calib)
        kw = {"dataset": ds, "num_calibration_samples": len(ds), "max_seq_length": len(ds[0]["input_ids"])}
    oneshot(model=model, recipe=modifier, **kw)
    model.save_pretrained(dst, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    (dst / "recipe.yaml").unlink(missing_ok=True)  # llm-compressor's own record; not part of the format


def to_act_order(src: Path, dst: Path, original: Path, group_size: int = GS) -> None:
    """Rewrite the asymmetric RTN export ``src`` into the act-order "group" layout (module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    args = QuantizationArgs(num_bits=w["num_bits"], symmetric=w["symmetric"], strategy="group", group_size=group_size)
    plain = dict(load_file(str(original / "model.safetensors")))
    tensors = dict(load_file(str(dst / "model.safetensors")))
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        m = key.removesuffix(".weight_packed")
        W = plain[f"{m}.weight"]  # [O, In] bf16
        O, In = W.shape
        perm = torch.argsort(W.float().norm(dim=0), descending=True, stable=True)  # group order
        g_idx = torch.empty(In, dtype=torch.int32)
        g_idx[perm] = (torch.arange(In) // group_size).to(torch.int32)
        Wp = W[:, perm].unflatten(-1, (In // group_size, group_size))  # [O, G, group_size] in group order
        scale, zp = calculate_qparams(Wp.amin(-1), Wp.amax(-1), args)  # [O, G]
        codes = quantize(W[:, perm], scale, zp, args, dtype=torch.int8)  # [O, In] group order
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes  # column order, as stored
        tensors[f"{m}.weight_packed"] = pack_to_int32(unperm, args.num_bits)
        tensors[f"{m}.weight_scale"] = scale.to(W.dtype)
        tensors[f"{m}.weight_zero_point"] = pack_to_int32(zp.to(torch.int8), args.num_bits, packed_dim=0)
        tensors[f"{m}.weight_g_idx"] = g_idx
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    w["actorder"] = "group"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def logits_of(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits  # [B, S, V]


def main() -> None:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "peer"))
    out = Path(ap.parse_args().out)
    logging.basicConfig(level=logging.INFO)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = originals(out)
    q3, q2 = src["qwen3_moe"], src["qwen2_moe"]
    base_ignore = ["lm_head", ROUTERS]
    runs = {
        "rtn-w4g16": (q3, QuantizationModifier(config_groups={"g": scheme(4)}, ignore=base_ignore)),
        "gptq-w4g16-actorder": (q3, GPTQModifier(config_groups={"g": scheme(4, actorder="weight")},
                                                 ignore=base_ignore)),
        "rtn-w4g16-asym": (q3, QuantizationModifier(config_groups={"g": scheme(4, symmetric=False)},
                                                    ignore=base_ignore)),
        "ignore-layer": (q3, QuantizationModifier(config_groups={"g": scheme(4)},
                                                  ignore=[*base_ignore, "re:model\\.layers\\.0\\.mlp\\.experts\\..*"])),
        "ignore-modules-w8": (q3, QuantizationModifier(
            config_groups={"int8": scheme(8, group=None, targets=["re:model\\.layers\\.1\\.self_attn\\..*"]),
                           "int4": scheme(4)},
            ignore=[*base_ignore, f"model.layers.{SE[0]}.mlp.experts.{SE[1]}.down_proj",
                    "model.layers.0.self_attn.o_proj"])),
        "qwen2-rtn-w4g16": (q2, QuantizationModifier(config_groups={"g": scheme(4)},
                                                     ignore=[*base_ignore, "re:.*shared_expert_gate$"])),
    }
    for name, (s, mod) in runs.items():
        export(s, out / name, mod)
    to_act_order(out / "rtn-w4g16-asym", out / "gidx-w4g16-asym", q3)

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))  # [B, S]
    logits = {"ids": ids, "original/qwen3_moe": logits_of(q3, ids), "original/qwen2_moe": logits_of(q2, ids)}
    manifest = {"made_with": {}, "exports": {}}
    import compressed_tensors
    import llmcompressor
    import transformers

    manifest["made_with"] = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                             "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__}
    for name in [*runs, "gidx-w4g16-asym"]:
        arch = "qwen2_moe" if name.startswith("qwen2") else "qwen3_moe"
        entry = {"arch": arch, "original": f"original-{arch}"}
        try:
            ref = logits[f"original/{arch}"]
            entry["transformers_5_17_rel_err"] = float((logits_of(out / name, ids) - ref).norm() / ref.norm())
        except Exception as e:  # recorded: which peer exports transformers 5.17 itself cannot load
            entry["transformers_5_17_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        manifest["exports"][name] = entry
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in logits.items()}, str(out / "logits.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
