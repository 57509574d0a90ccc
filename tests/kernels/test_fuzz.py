"""Kernel fuzzing with hypothesis: random shapes, bit widths and group sizes against the
references (CPU: Triton's interpreter, so the example counts are small and fixed by
derandomize=True; pack/unpack are fuzzed in test_packing.py)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbq_kernels.act_quant import act_quant
from cbq_kernels.fake_quant import fake_quant, fake_quant_ref
from cbq_kernels.gemm import gemm_w4a4, gemm_w4a8, gemm_wonly, prepare_weight
from cbq_kernels.packing import pack_ref, unpack_ref
from cbq_kernels.quant_math import dequantize_weight


@st.composite
def fake_quant_case(draw):
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 150))
    group = draw(st.sampled_from([None, 1, 7, 16, 32, 64, 200]))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    factors = draw(st.sampled_from(["none", "shared", "segment"]))
    seed = draw(st.integers(0, 2**16))
    return n, k, group, bits, symmetric, factors, seed


@settings(max_examples=150, deadline=None, derandomize=True)
@given(fake_quant_case())
def test_fake_quant_kernel_equals_reference(case):
    n, k, group, bits, symmetric, factors, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * 0.1
    groups = 1 if group is None else -(-k // group)
    fmax = fmin = None
    if factors != "none":
        shape = (1,) if factors == "shared" else (n, groups)
        fmax = torch.rand(shape, generator=g) * 0.5 + 0.5
        fmin = None if symmetric else torch.rand(shape, generator=g) * 0.5 + 0.5
    got = fake_quant(x, bits, group, fmax, fmin, symmetric)
    assert torch.equal(got, fake_quant_ref(x, bits, group, fmax, fmin, symmetric))


@st.composite
def gemm_case(draw):
    m = draw(st.integers(1, 20))
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 6)) * 32 + draw(st.sampled_from([0, 0, 5]))
    group = draw(st.sampled_from([None, 32, 64]))
    act_bits = draw(st.sampled_from([4, 8, None]))
    seed = draw(st.integers(0, 2**16))
    return m, n, k, group, act_bits, seed


@settings(max_examples=80, deadline=None, derandomize=True)
@given(gemm_case())
def test_gemm_accumulators_and_weight_only_against_references(case):
    m, n, k, group, act_bits, seed = case
    if group is not None and k % group:
        group = None  # the integer GEMMs take groups that divide K (ragged: per channel)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if group is None else k // group
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (n, groups), generator=g).float()
    w = prepare_weight(pack_ref(codes, 4), 4, k, scales, zeros, group)
    x = torch.randn(m, k, generator=g)
    gid = torch.arange(k) // (group or k)
    signed = codes.to(torch.int64) - zeros.to(torch.int64)[:, gid]
    if act_bits is None:  # weight-only: against the fp64 product of the dequantized weight
        got = gemm_wonly(x.to(torch.bfloat16), w).double()
        want = x.to(torch.bfloat16).double() @ dequantize_weight(codes, scales, zeros, group,
                                                                  torch.float64).t()  # fmt: skip
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max()) + 1e-3
        return
    xq, xs = act_quant(x, act_bits)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    acc = fn(xq, xs, w, debug=True)
    x_int = xq.to(torch.int64) if act_bits == 8 else unpack_ref(xq, 4, k).to(torch.int64) - 8
    assert torch.equal(acc.to(torch.int64), x_int @ signed.t())
