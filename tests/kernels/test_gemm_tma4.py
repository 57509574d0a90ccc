"""The W4A8 prefill GEMM on the split-nibble weight (cbq_kernels.gemm_tma4) on the CPU
(Triton's interpreter): the layout, exact int32 sums with and without zero points, the same
output bits as the int8 TMA kernel on the expanded weight, and its errors."""

import pytest
import torch

from cbq_kernels.gemm_tma import gemm_int8_tma
from cbq_kernels.gemm_tma4 import gemm_w4a8_split, half_width, split_nibbles

# (M, N, K): tails in M and N for the 16 x 32 interpreter tiles; K = 48 and 80 put the high
# nibbles' codes (from H = 32 / 48) in a partial 16-byte step, K = 16 has no high codes
SHAPES = ((5, 40, 48), (37, 70, 96), (3, 33, 80), (20, 64, 16))


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    return x, q, z, g


@pytest.mark.parametrize("k", [16, 48, 80, 96, 33])
def test_the_layout(k):
    q = torch.randint(0, 16, (3, k), generator=torch.Generator().manual_seed(k),
                      dtype=torch.uint8)  # fmt: skip
    w = split_nibbles(q)
    h = half_width(k)
    assert w.shape == (3, h) and h % 16 == 0 and 2 * h >= k
    lo, hi = (w & 15).long(), (w >> 4).long()
    codes = torch.cat([lo, hi], dim=1)[:, :k]  # byte j: code j low, code h + j high
    assert torch.equal(codes, q.long())
    assert not torch.cat([lo, hi], dim=1)[:, k:].any()  # padding codes are 0
    with pytest.raises(ValueError, match="codes must be a 2-D uint8 tensor"):
        split_nibbles(q.to(torch.int32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_zeros", [False, True])
def test_int32_sums_are_exact(shape, with_zeros):
    m, n, k = shape
    x, q, z, _ = _case(m, n, k)
    zeros = z if with_zeros else None
    acc = gemm_w4a8_split(x, torch.ones(m), split_nibbles(q), k, zeros, torch.ones(n),
                          debug=True)  # fmt: skip
    assert acc.dtype == torch.int32
    w = q.long() - (z.long()[:, None] if with_zeros else 0)
    assert torch.equal(acc.long(), x.long() @ w.t())


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_form_is_exact(shape):
    """W4A4 codes held as fp8 e4m3 (exact), fp8 MMAs with fp32 sums: the same int32 sums."""
    m, n, k = shape
    _, q, z, g = _case(m, n, k, seed=2)
    x = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    acc = gemm_w4a8_split(x.float().to(torch.float8_e4m3fn), torch.ones(m), split_nibbles(q), k,
                          z, torch.ones(n), debug=True)  # fmt: skip
    assert torch.equal(acc.long(), x.long() @ (q.long() - z.long()[:, None]).t())


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_same_bits_as_the_int8_kernel_on_the_expanded_weight(shape, bias, out_dtype):
    """The same two fp32 products in the same order on the same exact sums."""
    m, n, k = shape
    x, q, z, g = _case(m, n, k, seed=1)
    xs, ws = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    b = torch.randn(n, generator=g) if bias else None
    got = gemm_w4a8_split(x, xs, split_nibbles(q), k, z, ws, b, out_dtype)
    want = gemm_int8_tma(x, xs, (q.to(torch.int16) - z.to(torch.int16)[:, None]).to(torch.int8),
                         ws, b, out_dtype)  # fmt: skip
    assert torch.equal(got, want)


def test_errors():
    x, q, z, _ = _case(4, 8, 48)
    w = split_nibbles(q)
    with pytest.raises(ValueError, match="do not make K = 80"):  # rows of 32 bytes, not 48
        gemm_w4a8_split(torch.zeros(4, 80, dtype=torch.int8), torch.ones(4), w, 80, z,
                        torch.ones(8))  # fmt: skip
    with pytest.raises(ValueError, match="needs int8 or fp8 e4m3 x with K % 16 == 0"):
        gemm_w4a8_split(x.float(), torch.ones(4), w, 48, z, torch.ones(8))
