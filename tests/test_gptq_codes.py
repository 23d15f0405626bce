"""Reading GPTQ-packed tensors (pure unpacking; no gptqmodel needed)."""
import pytest
import torch

from secompress.errors import SecompressError
from secompress.quant import rtn
from secompress.quant.gptq_codes import gptq_qtensor, unpack_rows


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference packer: each column's values as one little-endian bit stream in int32 words
    (AutoGPTQ / gptqmodel's layout, 3-bit values straddling words)."""
    n, C = values.shape
    words = (n * bits + 31) // 32
    out = torch.zeros(words, C, dtype=torch.int64)
    for c in range(C):
        acc = 0
        for i in range(n):
            acc |= int(values[i, c]) << (i * bits)
        for w in range(words):
            out[w, c] = (acc >> (32 * w)) & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_rows_reads_the_bit_stream(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (64, 5), generator=g)
    assert torch.equal(unpack_rows(_pack_rows(v, bits), bits, 64), v.to(torch.uint8))


def test_gptq_qtensor_dequantizes_like_gptq_v1():
    g = torch.Generator().manual_seed(0)
    O, In, gs, bits = 8, 64, 32, 4
    q = torch.randint(0, 16, (In, O), generator=g)  # [In, O] as GPTQ stores them
    z = torch.randint(1, 16, (In // gs, O), generator=g)  # true zeros; v1 stores z - 1
    s = torch.rand(In // gs, O, generator=g).half()
    qt = gptq_qtensor(_pack_rows(q, bits), _pack_rows((z - 1).T, bits).T.contiguous(), s,
                      torch.arange(In, dtype=torch.int32) // gs, bits, In)
    want = (s.float().repeat_interleave(gs, 0) * (q - z.repeat_interleave(gs, 0))).T  # [O, In]
    torch.testing.assert_close(rtn.dequantize(qt), want)
    with pytest.raises(SecompressError, match="not contiguous"):
        gptq_qtensor(_pack_rows(q, bits), _pack_rows((z - 1).T, bits).T.contiguous(), s,
                     torch.arange(In, dtype=torch.int32).flip(0) // gs, bits, In)
