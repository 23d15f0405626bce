"""Read a GPTQ checkpoint's packed weights back into secompress's integer-coded modules.

gptqmodel (format ``gptq``, i.e. GPTQ v1, ``desc_act=False``) stores each quantized Linear as
  qweight [In * b / 32, O] int32   codes packed along the input features, a little-endian bit stream
  qzeros  [G, O * b / 32]  int32   zero points minus one, packed along the output features
  scales  [G, O]           fp16
  g_idx   [In]             int32   group of each input feature
and dequantizes ``W[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + 1))`` with ``g = g_idx[i]``.
That is the RTN layout of :mod:`secompress.quant.rtn` (codes [O, In], scales / zeros [O, G])
when groups are contiguous, so a GPTQ result runs in this process as
:class:`~secompress.quant.api.QuantizedLinear` modules, without importing gptqmodel (which
patches transformers). The recipe pipeline evaluates GPTQ this way; the export stays
gptqmodel's own folder. Legend: O out features, In in features, G groups, b bits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SecompressError
from ..checkpoints import check_model
from ..streaming import Checkpoint, disk_key
from . import rtn
from .plan import QuantPlan


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[R, C] int32 holding a little-endian bit stream per column -> [n, C] uint8 values."""
    u = packed.to(torch.int64) & 0xFFFFFFFF  # [R, C]
    bitplanes = (u[:, None, :] >> torch.arange(32, device=u.device)[None, :, None]) & 1  # [R, 32, C]
    stream = bitplanes.reshape(-1, packed.shape[1])[: n * bits]  # [n * b, C]
    if stream.shape[0] < n * bits:
        raise SecompressError(f"packed tensor {tuple(packed.shape)} holds fewer than {n} {bits}-bit values")
    weights = (1 << torch.arange(bits, device=u.device))[None, :, None]
    return (stream.reshape(n, bits, -1) * weights).sum(1).to(torch.uint8)


def gptq_qtensor(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, in_features: int) -> rtn.QTensor:
    """One GPTQ v1 Linear as an :class:`~secompress.quant.rtn.QTensor` (codes [O, In], scales/zeros [O, G])."""
    G, O = scales.shape
    gs = in_features // G
    if G * gs != in_features or not torch.equal(g_idx.long(),
                                                torch.arange(in_features, device=g_idx.device) // gs):
        raise SecompressError("GPTQ groups are not contiguous (desc_act / act-order checkpoints are not supported)")
    codes = unpack_rows(qweight, bits, in_features).T.contiguous()  # [O, In]
    zeros = unpack_rows(qzeros.T.contiguous(), bits, O).T.to(torch.int16) + 1  # [G, O]: v1 stores z - 1
    if (zeros > 255).any():
        raise SecompressError("a GPTQ zero point overflows 8 bits (v1 format at 8 bits): not representable here")
    return rtn.QTensor(codes, scales.T.contiguous().to(rtn.SCALE_DTYPE), zeros.T.contiguous().to(torch.uint8), bits)


@torch.no_grad()
def load_gptq_codes(model, plan: QuantPlan, path: str | Path) -> None:
    """Replace every unit ``plan`` quantizes by the GPTQ codes stored at ``path`` (in place)."""
    from .api import apply_plan

    path = Path(path)
    qcfg = json.loads((path / "quantize_config.json").read_text())
    if qcfg.get("checkpoint_format", qcfg.get("format")) != "gptq" or qcfg.get("desc_act"):
        raise SecompressError(f"'{path}': only gptq-format checkpoints without desc_act are read here")
    adapter = check_model(model)
    ckpt = Checkpoint(path, raw=True)  # reads its own codes

    experts = f".{adapter.moe_block}.{adapter.experts}."

    def make(key: str, w: torch.Tensor, bits: int) -> rtn.QTensor:  # w [O, In]
        # expert projection keys "<layer>.mlp.experts.<e>.<proj>" name per_expert modules in the model tree
        # gptqmodel names defused experts after the transformers-5 tree (Mixtral: mlp.experts.<e>.gate_proj);
        # a checkpoint in the transformers-4 layout (block_sparse_moe.experts.<e>.w1) is read too
        legacy = disk_key(adapter, key.replace(experts, f"{experts}per_expert.", 1))
        prefix = next((p for p in (key, legacy) if f"{p}.qweight" in ckpt), None)
        if prefix is None:
            raise SecompressError(f"'{path}' has no GPTQ weight '{key}.qweight' for a {bits}-bit unit")
        t = {s: ckpt.get(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        qt = gptq_qtensor(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, w.shape[1])
        if qt.codes.shape != w.shape:
            raise SecompressError(f"'{prefix}': GPTQ codes {tuple(qt.codes.shape)} != weight {tuple(w.shape)}")
        return rtn.QTensor(*(x.to(w.device) for x in (qt.codes, qt.scales, qt.zeros)), bits)

    with ckpt.reading():
        apply_plan(model, plan, make)
