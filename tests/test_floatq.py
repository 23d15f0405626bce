"""secompress.quant.floatq reproduces compressed-tensors' quantizers bit for bit (FP8, INT8, NVFP4, MXFP4)."""
import pytest
import torch

from secompress.quant import floatq
from secompress.quant.floatq import QArgs

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp  # noqa: E402
from compressed_tensors.quantization.utils.helpers import generate_gparam  # noqa: E402

from secompress.quant.schemes import get_scheme  # noqa: E402

WEIGHT_SCHEMES = ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "W4A16", "NVFP4", "MXFP4"]
ACT_SCHEMES = ["FP8_DYNAMIC", "FP8_BLOCK", "W8A8", "NVFP4", "MXFP4", "W4AFP8"]


def ct_args(name, which):
    s = get_scheme(name).ct_scheme(["Linear"])
    return s.weights if which == "weights" else s.input_activations


def ct_minmax(w, a):
    """Independent min/max per scale entry, in compressed-tensors' observer layout."""
    O, In = w.shape
    if a.strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if a.strategy == "channel":
        return w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    if a.strategy in ("group", "tensor_group"):
        g = w.reshape(O, In // a.group_size, a.group_size)
        return g.min(-1).values, g.max(-1).values
    bh, bw = a.block_structure
    b = w.reshape(O // bh, bh, In // bw, bw).permute(0, 2, 1, 3).reshape(O // bh, In // bw, -1)
    return b.min(-1).values, b.max(-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", WEIGHT_SCHEMES)
def test_weight_quantizers_match_compressed_tensors(name, dtype):
    torch.manual_seed(0)
    w = (torch.randn(256, 256) * torch.rand(256, 1) * 3).to(dtype)
    w[3, 7] = 40.0  # an outlier
    a, q = ct_args(name, "weights"), get_scheme(name).weights
    lo, hi = ct_minmax(w, a)
    g = generate_gparam(w.min(), w.max()) if a.strategy == "tensor_group" else None
    s_ct, zp = calculate_qparams(lo, hi, a, global_scale=g)
    s, g2 = floatq.weight_scale(w, q)
    assert torch.equal(s, s_ct) and s.dtype == s_ct.dtype
    assert (g is None and g2 is None) or torch.equal(g, g2)
    fq_ct = ct_forward.fake_quantize(w, s_ct, zp, a, global_scale=g)
    fq = floatq.qdq(w, s, q, g2)
    assert torch.equal(fq, fq_ct) and fq.dtype == fq_ct.dtype
    codes_ct = ct_forward.quantize(w, s_ct, zp, a, dtype=None if q.num_bits == 4 else a.pytorch_dtype(),
                                   global_scale=g)
    codes = floatq.quantize(w, s, q, g2)
    assert torch.equal(codes.float(), codes_ct.float()) and (q.num_bits == 4 or codes.dtype == codes_ct.dtype)
    deq_ct = ct_forward.dequantize(codes_ct, s_ct, zp, a, dtype=dtype, global_scale=g)
    assert torch.equal(floatq.dequantize(codes, s, q, g2, dtype), deq_ct)
    err = (w.float() - fq.float()).abs()
    assert err.max() > 0 and err.mean() < 0.2 * w.float().abs().mean()  # quantized, and close


@pytest.mark.parametrize("name", ACT_SCHEMES)
def test_dynamic_activations_match_compressed_tensors(name):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 256) * 2
    x[0, 0, 11] = 300.0  # a massive activation on one token
    a, q = ct_args(name, "inputs"), get_scheme(name).inputs
    g = generate_gparam(x.min(), x.max()) if a.strategy == "tensor_group" else None
    s_ct, zp = compute_dynamic_scales_and_zp(value=x, args=a, module=None, global_scale=g)
    s = floatq.dynamic_scale(x, q, g)
    assert torch.equal(s, s_ct)
    assert torch.equal(floatq.qdq(x, s, q, g), ct_forward.fake_quantize(x, s_ct, zp, a, global_scale=g))
    if q.strategy == "token":  # per token: the massive token does not touch the others
        other = floatq.qdq(x[:, 1:], floatq.dynamic_scale(x[:, 1:], q), q)
        assert torch.equal(other, floatq.qdq(x, s, q)[:, 1:])


def test_static_tensor_scale_and_global_scale():
    x = torch.randn(64, 256)
    x[0, 3] = 500.0
    fp8 = ct_args("FP8", "inputs")
    s_ct, _ = calculate_qparams(x.min().reshape(1), x.max().reshape(1), fp8)
    s = floatq.scale_from_minmax(x.min().reshape(1), x.max().reshape(1), get_scheme("FP8").inputs)
    assert torch.equal(s, s_ct) and torch.allclose(s, torch.tensor([500.0 / 448]))
    assert torch.equal(floatq.global_scale(x.abs().max()), generate_gparam(x.min(), x.max()))
    assert floatq.global_scale(torch.tensor(0.0)).item() == 1.0 or floatq.global_scale(torch.tensor(0.0)).isfinite()


def test_int8_uses_the_full_range():
    """compressed-tensors' symmetric INT8: scale amax / 127.5, codes in [-128, 127]."""
    q = get_scheme("W8A8").weights
    w = torch.tensor([[-2.55, 1.0, 2.55, 0.0]])
    s, _ = floatq.weight_scale(w, q)
    assert torch.allclose(s, torch.tensor([[0.02]]))
    codes = floatq.quantize(w, s, q)
    assert codes.dtype == torch.int8 and codes.tolist() == [[-128, 50, 127, 0]]


def test_fp4_rounding_and_packing():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    v = torch.tensor([[0.2, 0.25, 0.3, 0.75, 1.25, 1.3, 2.5, 2.6, 3.5, 5.0, 5.1, -0.75, -2.5, -6.0, 9.0, -0.0]])
    r = floatq.round_fp4(v)
    assert r.tolist()[0] == [0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 3.0, 4.0, 4.0, 6.0, -1.0, -2.0, -6.0, 6.0, 0.0]
    vals = floatq.round_fp4(torch.randn(8, 32) * 3)
    packed = floatq.pack_fp4(vals)
    assert packed.dtype == torch.uint8 and torch.equal(packed, pack_fp4_to_uint8(vals))
    assert torch.equal(floatq.unpack_fp4(packed), unpack_fp4_from_uint8(packed, 8, 32, torch.float32))


def test_mx_scales_are_powers_of_two_and_cover_the_group():
    q = get_scheme("MXFP4").weights
    w = torch.randn(16, 64) * 10
    s, _ = floatq.weight_scale(w, q)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))  # E8M0: powers of two
    fq = floatq.qdq(w, s, q)
    assert (fq.abs() <= 6 * s.repeat_interleave(32, -1) + 1e-6).all()


def test_bad_args_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        QArgs(4, "float", "group")
    with pytest.raises(ValueError, match="local"):
        QArgs(4, "float", "group", 16, dynamic="local")
    with pytest.raises(ValueError, match="strategy"):
        QArgs(8, "float", "row")
