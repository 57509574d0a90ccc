"""The TMA-descriptor int8 GEMM (cbq_kernels.gemm_tma) on the CPU (Triton's interpreter):
exact int32 sums, the same output bits as the pointer kernel after expansion, and the policy
that selects it."""

import pytest
import torch

from cbq_kernels import gemm_tma
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import GemmPolicy, gemm_w4a4, gemm_w4a8
from cbq_kernels.gemm_tma import gemm_int8_tma, takes
from cbq_kernels.packing import unpack_ref
from tests.kernels.test_gemm import make_weight

# (M, N, K): tails in M and N for the 16 x 32 interpreter tiles, K a multiple of 16 (TMA's
# 16-byte rows) but not of the 32-wide K tile; more tiles than the 4 interpreter programs
SHAPES = ((5, 40, 48), (37, 70, 96), (64, 64, 32))
# the pointer kernel after expansion, the same weight and codes; the TMA kernel from M = 1
POINTER = GemmPolicy(expand_min_m=1, tma_min_m=0)
TMA = GemmPolicy(expand_min_m=1, tma_min_m=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_int32_sums_are_exact(shape):
    m, n, k = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-15, 16, (n, k), generator=g, dtype=torch.int8)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    acc = gemm_int8_tma(x, ones_m, w, ones_n, None, torch.float32, debug=True)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), x.long() @ w.long().t())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_same_bits_as_the_pointer_kernel(shape, act_bits, bias, out_dtype, monkeypatch):
    """The same two fp32 products in the same order on the same exact sums: equal outputs."""
    calls = []
    real = gemm_tma.gemm_int8_tma
    monkeypatch.setattr(gemm_tma, "gemm_int8_tma",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m, n, k = shape
    w, codes = make_weight(n, k, 4, None, seed=2, layout="both")
    g = torch.Generator().manual_seed(3)
    xq, xs = act_quant(torch.randn(m, k, generator=g) * 3, act_bits)
    b = torch.randn(n, generator=g) if bias else None
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    got = fn(xq, xs, w, b, out_dtype=out_dtype, policy=TMA)
    want = fn(xq, xs, w, b, out_dtype=out_dtype, policy=POINTER)
    assert torch.equal(got, want) and len(calls) == 1  # the TMA kernel ran once, for `got`
    raw = fn(xq, xs, w, debug=True, policy=TMA)
    x_int = xq.long() if act_bits == 8 else unpack_ref(xq, 4, k).long() - 8
    assert torch.equal(raw.long(), x_int @ (codes.long() - w.zeros.long()).t())
    assert len(calls) == 2


def test_what_it_takes():
    x = torch.zeros(4, 48, dtype=torch.int8)
    assert takes(x, torch.zeros(8, 48, dtype=torch.int8))
    assert not takes(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(8, 40, dtype=torch.int8))
    assert not takes(x.float(), torch.zeros(8, 48, dtype=torch.int8))
    assert not takes(torch.zeros(48, 4, dtype=torch.int8).t(), torch.zeros(8, 48, dtype=torch.int8))


def test_the_policy_leaves_other_products_to_the_pointer_kernel():
    """K % 16 != 0 (no 16-byte rows) and grouped weights: the pointer kernel, the same
    result as without the TMA policy."""
    for k, group in ((40, None), (64, 32)):
        w, _ = make_weight(24, k, 4, group, seed=4, layout="both")
        xq, xs = act_quant(torch.randn(9, k, generator=torch.Generator().manual_seed(5)), 8)
        assert torch.equal(gemm_w4a8(xq, xs, w, policy=TMA), gemm_w4a8(xq, xs, w, policy=POINTER))


def test_the_policy_field_is_checked():
    with pytest.raises(ValueError, match="tma_min_m must be a non-negative int"):
        GemmPolicy(tma_min_m=-1)
