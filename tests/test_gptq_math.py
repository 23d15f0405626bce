"""GPTQ's math (secompress.quant.gptq_math) and its Hessian hooks (secompress.hessians).

The math against: RTN (GPTQ's output error is lower), the paper's unblocked loop written out here
(equal codes), the grid (codes dequantize inside it), gptqmodel's own GPTQ on the same Hessian
and weight (equal codes where the float16 scales are exact; gptqmodel runs in a child process).
"""
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from secompress.hessians import record_hessians
from secompress.quant import rtn
from secompress.quant.gptq_math import blocks, factor, gptq, hessian, xtx
from secompress.testing import make_tiny


def _inputs(T=2048, In=128, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, In, generator=g) @ (torch.randn(In, In, generator=g) / In ** 0.5) + torch.randn(In, generator=g)
    X[:, list(dead)] = 0
    return X


def _out_err(X, W, qt):
    return float(((X @ (rtn.dequantize(qt, torch.float64) - W.double()).T.float()) ** 2).mean())


def reference_loop(w, h, bits, group_size, symmetric, damp=0.01):
    """GPTQ column by column, unblocked (the paper's Algorithm 1 without lazy batches), in float64:
    dead columns, dampening, H^-1's upper Cholesky factor, each group's grid when the group starts."""
    W, H = w.double().clone(), h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    maxq, In = 2 ** bits - 1, W.shape[1]
    gs = group_size or In
    codes, scales, zeros = torch.zeros(W.shape, dtype=torch.uint8), [], []
    for j in range(In):
        if j % gs == 0:
            g = rtn.quantize(W[:, j:j + gs], bits, None, symmetric)  # the RTN grid of the current weights
            s, z = g.scales[:, 0].double(), g.zeros[:, 0].double()
            scales.append(g.scales[:, 0])
            zeros.append(g.zeros[:, 0])
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        codes[:, j] = q.to(torch.uint8)
        err = (W[:, j] - (q - z) * s) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (4, None), (8, 64)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_has_lower_output_error_than_rtn(bits, group_size, symmetric):
    X = _inputs()
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    H = hessian(xtx(X), X.shape[0])
    g, r = gptq(W, H, bits, group_size, symmetric), rtn.quantize(W, bits, group_size, symmetric)
    assert _out_err(X, W, g) < 0.75 * _out_err(X, W, r), (_out_err(X, W, g), _out_err(X, W, r))


@pytest.mark.parametrize("group_size, block_size", [(32, 128), (32, 48), (64, 32), (128, 128), (None, 40), (16, 16)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_blocked_gptq_equals_the_unblocked_reference_loop(group_size, block_size, symmetric):
    X = _inputs(In=128, dead=(5, 77)).double()  # two dead input features
    W = torch.randn(40, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    H = hessian(xtx(X), X.shape[0])
    qt = gptq(W, H, 4, group_size, symmetric, block_size=block_size)
    codes, scales, zeros = reference_loop(W, H, 4, group_size, symmetric)
    assert torch.equal(qt.codes, codes) and torch.equal(qt.scales, scales) and torch.equal(qt.zeros, zeros)
    for i1, i2 in blocks(128, group_size or 128, block_size):  # no group straddles a block end
        assert all(j == i1 or j + (group_size or 128) <= i2 for j in range(i1, i2) if j % (group_size or 128) == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_dequantize_inside_the_grid(bits, symmetric):
    X = _inputs(In=64, dead=(3,))
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    W[:4] = 0  # all-zero rows (their groups too)
    qt = gptq(W, hessian(xtx(X), X.shape[0]), bits, 32, symmetric)
    maxq = 2 ** bits - 1
    assert qt.codes.dtype == torch.uint8 and qt.zeros.dtype == torch.uint8 and qt.scales.dtype == rtn.SCALE_DTYPE
    assert qt.codes.shape == (32, 64) and qt.scales.shape == qt.zeros.shape == (32, 2)
    assert int(qt.codes.max()) <= maxq and int(qt.zeros.max()) <= maxq and bool((qt.scales > 0).all())
    if symmetric:
        assert bool((qt.zeros == 2 ** (bits - 1)).all())  # GPTQ's / RTN's symmetric zero point
    w_hat = rtn.dequantize(qt)  # [32, 64]
    s, z = qt.scales.float().repeat_interleave(32, 1), qt.zeros.float().repeat_interleave(32, 1)
    assert torch.equal(w_hat, (qt.codes.float() - z) * s)  # the grid's points, nothing else
    assert bool((w_hat >= -z * s).all() and (w_hat <= (maxq - z) * s).all())
    assert bool((w_hat[:, 3] == 0).all())  # a dead input feature's weights are 0
    assert bool((w_hat[:4] == 0).all())  # all-zero rows stay 0 (nothing to compensate)
    assert float((w_hat - W).abs().max()) < float(W.abs().max())  # and near the weights


def test_batched_and_shared_hessians_equal_one_matrix_at_a_time():
    E, g = 3, torch.Generator().manual_seed(4)
    We = torch.randn(E, 24, 64, generator=g)
    He = torch.stack([hessian(xtx(_inputs(500, 64, seed=e)), 500) for e in range(E)])
    qb = gptq(We, He, 4, 16, False)  # one Hessian per matrix: batched Cholesky and updates
    qs = gptq(We, He[0], 4, 16, True)  # one Hessian for all: the rows of all matrices at once
    for e in range(E):
        one, same = gptq(We[e], He[e], 4, 16, False), gptq(We[e], He[0], 4, 16, True)
        assert torch.equal(qb.codes[e], one.codes) and torch.equal(qb.scales[e], one.scales)
        assert torch.equal(qs.codes[e], same.codes) and torch.equal(qs.zeros[e], same.zeros)
    with pytest.raises(ValueError, match="do not match"):
        gptq(We, He[:2], 4, 16)
    with pytest.raises(ValueError, match="does not divide"):
        gptq(We, He, 4, 24)


def test_damp_rises_for_a_singular_hessian_and_static_groups_use_the_original_weights():
    X = torch.randn(10, 64, generator=torch.Generator().manual_seed(5))  # rank 10 < 64
    H = hessian(xtx(X), 10)
    f = factor(H, damp=1e-9)  # not positive definite in float32 at that damp: raised until it is
    assert float(f.damp) > 1e-9 and torch.isfinite(f.u).all()
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    st = gptq(W, H, 4, 16, True, static_groups=True)
    ref = rtn.quantize(W, 4, 16, True)
    assert torch.equal(st.scales, ref.scales) and torch.equal(st.zeros, ref.zeros)
    with pytest.raises(ValueError, match="damp"):
        factor(H, damp=1.5)


# ---- parity with gptqmodel's GPTQ ------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ
    out = []
    for d in torch.load(sys.argv[1], weights_only=True):
        lin = nn.Linear(d["w"].shape[1], d["w"].shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(d["w"])
        cfg = QuantizeConfig(bits=d["bits"], group_size=d["gs"], sym=d["sym"], desc_act=False,
                             static_groups=d["static"], act_group_aware=False, damp_percent=0.01,
                             damp_auto_increment=0.0)
        g = GPTQ(lin, cfg)
        g.quantizer.configure(perchannel=True)
        g.H, g.nsamples = d["h"].clone(), 1000
        q, scale, zero = g.quantize(blocksize=d["bs"])[:3]
        out.append({"q": q.float(), "scale": scale.float(), "zero": zero.float()})
    torch.save(out, sys.argv[2])
""")


def _exact_scale_weight(O, In, gs, bits, symmetric, seed):
    """Weights whose every group has a float16-exact RTN scale (a power of two), so that gptqmodel's
    float32 scales and secompress's float16 ones are the same numbers."""
    g, maxq = torch.Generator().manual_seed(seed), 2 ** bits - 1
    s = 2.0 ** torch.randint(-8, -4, (O, In // gs), generator=g).float()
    if symmetric:
        lim = s * maxq / 2
        w = (torch.rand(O, In // gs, gs, generator=g) * 2 - 1) * lim[..., None] * 0.9
        w[..., 0] = lim
    else:
        z = torch.randint(1, maxq, (O, In // gs), generator=g).float()
        lo, hi = -z * s, (maxq - z) * s
        w = lo[..., None] + torch.rand(O, In // gs, gs, generator=g) * (hi - lo)[..., None]
        w[..., 0], w[..., 1] = lo, hi
    return w.reshape(O, In)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel (the cross-check) not installed")
def test_parity_with_gptqmodel(tmp_path):
    X = _inputs(4096, 128, dead=(9,))
    H = hessian(xtx(X), X.shape[0])
    cases = [(True, True, 32, 4), (True, False, 32, 4), (True, True, 64, 3), (True, False, 128, 8),
             (False, True, 32, 4), (False, False, 32, 4)]
    jobs = [{"w": _exact_scale_weight(32, 128, gs, bits, sym, seed=gs + bits), "h": H, "bits": bits, "gs": gs,
             "sym": sym, "static": static, "bs": 128 if static else gs}  # dynamic: gptqmodel's grid exact per block
            for static, sym, gs, bits in cases]
    torch.save(jobs, tmp_path / "in.pt")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True)  # gptqmodel patches transformers on import: a child
    assert r.returncode == 0, r.stderr[-2000:]
    for job, theirs in zip(jobs, torch.load(tmp_path / "out.pt", weights_only=True)):
        W = job["w"]
        qt = gptq(W, H, job["bits"], job["gs"], job["sym"], static_groups=job["static"])
        if job["static"]:  # the same grids: the same GPTQ, code for code
            assert torch.equal(rtn.dequantize(qt), theirs["q"]), {k: v for k, v in job.items() if k not in "wh"}
            assert torch.equal(qt.scales.float(), theirs["scale"]) and torch.equal(qt.zeros.float(), theirs["zero"])
        else:  # grids chosen on the fly: float16 (rounded up) here, float32 there; the same quality
            ours, ref = _out_err(X, W, qt), float(((X @ (theirs["q"] - W).T) ** 2).mean())
            assert abs(ours / ref - 1) < 0.05, (ours, ref)


# ---- the hooks -------------------------------------------------------------------------------
def _layer_inputs(model, T=40):
    from secompress.checkpoints import check_model
    from secompress.streaming import capture_layer_inputs

    ids = torch.randint(3, 250, (2, T // 2), generator=torch.Generator().manual_seed(7))
    adapter = check_model(model)
    hidden, args = capture_layer_inputs(model, adapter, [ids])
    return adapter, hidden[0], args[0][0]


@pytest.mark.parametrize("all_experts", [False, True])
def test_record_hessians_sees_linear_inputs_and_each_experts_rows(all_experts):
    from secompress.experts import expert_act
    from secompress.streaming import run_layer

    model = make_tiny("qwen3_moe")
    adapter, h, (a, kw) = _layer_inputs(model)
    layer = adapter.layers(model)[0]
    attn, experts = layer.self_attn, layer.mlp.experts
    linears = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.update({n: args[0].detach().clone()}))
               for n, m in linears.items()]
    route = {}
    router_hook = layer.mlp.gate.register_forward_hook(lambda m, i, o: route.update(idx=o[-1], x=i[0]))
    with torch.no_grad():
        plain = run_layer(layer, h, a, kw)
    for hd in handles + [router_hook]:
        hd.remove()
    with torch.no_grad(), record_hessians(linears, {"mlp": (experts, [0, 2, 5])}, all_experts) as rec:
        hooked = run_layer(layer, h, a, kw)
    torch.testing.assert_close(hooked, plain)  # the layer's output is the routed experts' still
    assert "forward" not in experts.__dict__ and not attn.q_proj._forward_pre_hooks  # all undone
    assert rec.linear["q"] is rec.linear["k"] is rec.linear["v"] is not rec.linear["o"]  # one input, one sum
    for n in ("q", "o"):
        x = seen[n].reshape(-1, seen[n].shape[-1])
        torch.testing.assert_close(rec.linear[n].xtx, x.T @ x)
        assert rec.linear[n].rows == x.shape[0]
    st = rec.experts["mlp"]
    x, idx = route["x"], route["idx"]  # the MoE's input [T, H], its routing [T, K]
    for p, e in enumerate([0, 2, 5]):
        rows = x if all_experts else x[(idx == e).any(-1)]
        act = expert_act(experts, e, rows)
        assert st.tokens[p] == rows.shape[0]
        torch.testing.assert_close(st.gate_up if all_experts else st.gate_up[p], rows.T @ rows, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.down[p], act.T @ act, rtol=1e-4, atol=1e-4)
    assert st.shared == all_experts and (st.gate_up.ndim == 2) == all_experts
