"""GPTQ: pure tensor math, no modules, no hooks, no I/O.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv 2210.17323) quantizes a weight ``W [O, In]`` column by
column and, after each column, spreads that column's rounding error over the columns not yet
quantized so as to minimise ``||W X - W_hat X||^2`` over the calibration inputs ``X``. Everything
it needs of the inputs is the Hessian of that error, ``H = 2/n sum_t x_t x_t^T`` ([In, In],
float32), summed as the reference implementations do (gptqmodel: the float32 ``x^T x`` of every
batch added up, times ``2/n`` at the end):

1. **dead columns**: an input feature that is always 0 (``H_jj = 0``) gets ``H_jj = 1`` and its
   weights set to 0 (its value never matters on the calibration data);
2. **dampening**: ``H += percdamp * mean(diag H) * I`` (``damp``, 0.01 as in the paper's code and
   llm-compressor); if Cholesky still fails the damp is raised tenfold, up to 1;
3. ``U = chol(H^-1)^T`` (upper), the rows of the inverse Hessian the sequential updates need
   (the paper's Cholesky reformulation, Section 3 "Step 3");
4. columns in blocks of ``block_size`` (the paper's lazy batch updates): inside a block every
   column is rounded and its error ``(w - q) / U_jj`` applied to the block's later columns at once;
   the rest of the matrix gets the block's errors in one matrix product at the block's end;
5. **groups** (``group_size`` columns share a scale and zero point per row): a group's grid is
   chosen when its first column is reached, from the weights as updated by every earlier column
   (the paper's "lazy" grid, Section 4 "Grouping"). Blocks are cut so that a group never straddles
   a block end unless it starts a block, so the grid sees exactly the weights the unblocked
   algorithm would (gptqmodel and AutoGPTQ read it from a copy that misses the current block's
   updates when ``group_size < block_size``). ``static_groups``: every grid from the original
   weights instead (llm-compressor's observer, gptqmodel's ``static_groups``).

The grid of a group is secompress's RTN grid (:func:`secompress.quant.rtn.grid` of the group's
columns: asymmetric with 0 inside [min, max], or symmetric ``s = 2 max|w| / (2^b - 1)``,
``z = 2^(b-1)``; scales rounded up to float16) and every column is rounded with it and its error
measured against ``(q - z) * s`` with the stored float16 scale, so the result is a
:class:`~secompress.quant.rtn.QTensor` whose :func:`~secompress.quant.rtn.dequantize` is exactly the
weight GPTQ settled on. Act-order (``desc_act``: columns by decreasing ``H_jj``) permutes columns
across groups, which contiguous groups cannot store: it is not offered.

``W`` may carry leading dimensions (``[E, O, In]``: experts) with one Hessian each
(``[E, In, In]``: batched Cholesky and updates) or one Hessian for all (``[In, In]``: rows of every
matrix quantized together; rows are independent given ``H``). Float64 weights are computed in
float64 (tests compare against an unblocked loop); everything else in float32.
Legend: O out features (rows), In in features (columns), G = In / group_size groups, E matrices.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import rtn

log = logging.getLogger(__name__)
DAMP = 0.01  # percdamp of the paper's code and llm-compressor (gptqmodel: 0.05)
BLOCK_SIZE = 128
MAX_DAMP = 1.0
SMALL = 1 << 24  # problems with fewer (rows + columns) x columns run on one thread (see _threads)


def xtx(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` [In, In] in float32 of the rows of ``x [..., In]`` (one batch's Hessian term)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def hessian(xtx_sum: torch.Tensor, rows) -> torch.Tensor:
    """``H = 2/n sum x x^T`` from the summed ``x^T x`` [..., In, In] and ``n`` rows ([...] or a number)."""
    n = torch.as_tensor(rows, dtype=xtx_sum.dtype, device=xtx_sum.device)
    return xtx_sum * (2.0 / n.clamp(min=1))[..., None, None]


@dataclass(frozen=True)
class Factor:
    """What the column updates need of a Hessian: ``u`` [..., In, In] upper Cholesky factor of the
    dampened inverse, ``dead`` [..., In] input features never seen, ``damp`` [...] used."""

    u: torch.Tensor
    dead: torch.Tensor
    damp: torch.Tensor


def factor(h: torch.Tensor, damp: float = DAMP, dtype: torch.dtype = torch.float32) -> Factor:
    """Dead columns, dampening and ``chol(H^-1)^T`` of ``h`` [..., In, In] (not changed); per matrix
    the damp is raised tenfold until the Cholesky factorisations succeed (ValueError past 1)."""
    if h.ndim < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"a Hessian is [..., In, In], got shape {tuple(h.shape)}")
    if not 0 < damp < MAX_DAMP:
        raise ValueError(f"damp must be in (0, 1), got {damp}")
    H = h.to(dtype).clone()
    diag = H.diagonal(dim1=-2, dim2=-1)  # [..., In], a view
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    base = diag.clone()
    mean = base.mean(-1)  # [...]
    p = torch.full(mean.shape, damp, dtype=dtype, device=H.device)
    while True:
        diag.copy_(base + (p * mean)[..., None])
        L, info = torch.linalg.cholesky_ex(H)
        ok = info == 0
        if bool(ok.all()):
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            ok = info == 0
            if bool(ok.all()):
                return Factor(U, dead, p)
        if bool((p[~ok] * 10 > MAX_DAMP).any()):
            raise ValueError(f"a Hessian stays not positive definite with damp {MAX_DAMP}: the calibration inputs "
                             "are degenerate (non-finite or all-equal activations?)")
        log.warning("GPTQ: Hessian not positive definite at damp %.3g; raising it tenfold", float(p[~ok].max()))
        p = torch.where(ok, p, p * 10)


@contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside (None: unchanged). The per-column updates are a few
    small element-wise ops each; on small matrices splitting them over threads costs more CPU time in
    thread wake-ups and spin-waits than the work itself (measured 10x on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def blocks(columns: int, group_size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """Column blocks [i1, i2) such that every group lies inside one block or starts one."""
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    if group_size <= block_size:
        step = (block_size // group_size) * group_size  # whole groups per block
        cuts = set(range(0, columns, step))
    else:  # long groups: each starts a block
        cuts = set(range(0, columns, block_size)) | set(range(0, columns, group_size))
    cuts = sorted(cuts) + [columns]
    return list(zip(cuts[:-1], cuts[1:]))


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor | Factor, bits: int, group_size: int | None = 128,
         symmetric: bool = False, damp: float = DAMP, block_size: int = BLOCK_SIZE,
         static_groups: bool = False) -> rtn.QTensor:
    """GPTQ-quantize ``w`` [..., O, In] with Hessian ``h`` ([..., In, In] one per matrix, or [In, In]
    for all; or a :func:`factor` of it) -> QTensor (codes [..., O, In], scales / zeros [..., O, G])."""
    if w.ndim < 2:
        raise ValueError(f"expected a weight [..., out, in], got shape {tuple(w.shape)}")
    In = w.shape[-1]
    gs = rtn.check_args(bits, group_size, In, f"a weight of shape {tuple(w.shape)}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.numel() // In if (h.u if isinstance(h, Factor) else h).ndim == 2 else w.shape[-2]
    with _threads(1 if (rows + In) * In * (w.numel() // In // rows) < SMALL else None):
        f = h if isinstance(h, Factor) else factor(h, damp, dtype)
        if f.u.shape[-1] != In:
            raise ValueError(f"Hessian for {f.u.shape[-1]} input features, weight has {In}")
        lead = w.shape[:-2]
        if f.u.ndim == 2:  # one Hessian: every row of every matrix is a row of one [R, In] problem
            W, U, dead = w.reshape(1, -1, In), f.u[None], f.dead[None]
        elif tuple(f.u.shape[:-2]) == tuple(lead):
            W, U, dead = w.reshape(-1, *w.shape[-2:]), f.u.reshape(-1, In, In), f.dead.reshape(-1, In)
        else:
            raise ValueError(f"Hessians {tuple(f.u.shape)} do not match weights {tuple(w.shape)}")
        B, R = W.shape[:2]
        G = In // gs
        Wt = W.to(dtype).transpose(1, 2).contiguous()  # [B, In, R]: the working copy, a column a contiguous row
        Wt.masked_fill_(dead[..., None], 0.0)
        codes = torch.empty((B, In, R), dtype=torch.uint8, device=W.device)
        if static_groups:
            scales, zeros = rtn.grid(Wt.transpose(1, 2).reshape(B, R, G, gs), bits, symmetric)  # [B, R, G]
        else:
            scales = torch.empty((B, R, G), dtype=rtn.SCALE_DTYPE, device=W.device)
            zeros = torch.empty((B, R, G), dtype=torch.uint8, device=W.device)
        _columns(Wt, U.to(dtype), codes, scales, zeros, gs, block_size, bits, symmetric, static_groups)
    out = (*lead, *w.shape[-2:])
    return rtn.QTensor(codes.transpose(1, 2).reshape(out), scales.reshape(*out[:-1], G),
                       zeros.reshape(*out[:-1], G), bits)


def _columns(Wt, U, codes, scales, zeros, gs: int, block_size: int, bits: int, symmetric: bool,
             static_groups: bool) -> None:
    """The column loop of :func:`gptq` on ``Wt`` [B, In, R] (updated in place), writing ``codes``
    [B, In, R] and (unless ``static_groups``) ``scales`` / ``zeros`` [B, R, G]."""
    In, maxq, dtype = Wt.shape[1], 2 ** bits - 1, Wt.dtype
    for i1, i2 in blocks(In, gs, block_size):
        W1 = Wt[:, i1:i2]  # [B, b, R], a view: the block's columns are updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]  # [B, b, b]
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:
                g = j // gs
                if not static_groups:  # the group's grid from the weights as updated so far (else: j == i1)
                    scales[..., g], zeros[..., g] = rtn.grid(Wt[:, j:j + gs].transpose(1, 2), bits, symmetric)
                s, z = scales[..., g].to(dtype), zeros[..., g].to(dtype)  # [B, R]
            col = W1[:, i]  # [B, R]
            q = rtn.round_codes(col / s, z, maxq)
            codes[:, j] = q.to(torch.uint8)
            err = torch.div(col - (q - z) * s, U1[:, i, i, None], out=Err1[:, i])  # [B, R]
            W1[:, i + 1:].addcmul_(U1[:, i, i + 1:, None], err[:, None, :], value=-1)  # [B, b - i - 1, R]
        if i2 < In:
            Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1)  # [B, In - i2, b] x [B, b, R]
