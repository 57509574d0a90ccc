"""Inference GEMMs on the CPU (Triton's interpreter), small and odd shapes."""

import pytest
import torch

from cbq_kernels import gemm as gemm_module
from cbq_kernels import gemm_triton
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import (
    _A_FLOAT,
    GemmPolicy,
    PreparedWeight,
    _launch,
    gemm_ref,
    gemm_w4a4,
    gemm_w4a8,
    gemm_wonly,
    linear,
    prepare_weight,
)
from cbq_kernels.gemm_weight import concat_weights
from cbq_kernels.packing import pack_ref, unpack_ref

# (M, N, K): M in {1, 3, 13, 67}; N, K not multiples of the tiles, words or 32.
SHAPES = ((1, 33, 100), (3, 40, 64), (13, 5, 7), (67, 33, 200))


def make_weight(n, k, bits, group_size=None, seed=0, zeros=True, layout="auto"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if group_size is None else -(-k // group_size)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.005
    z = torch.randint(0, 1 << bits, (n, groups), generator=g).float() if zeros else None
    w = prepare_weight(pack_ref(codes, bits), bits, k, scales, z, group_size, layout=layout)
    return w, codes


def act_codes(m, k, bits, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    return act_quant(x, bits)


def use_swap(monkeypatch, swap):
    """Run the interpreter with the operand-swapped kernel (W x^T) or the plain one."""
    monkeypatch.setitem(gemm_triton._CPU_CONFIG, "SWAP", swap)


def expand_policy(expand: bool) -> GemmPolicy:
    """expand: 4-bit codes (and int4 activations) expanded to int8 before the K loop."""
    return GemmPolicy(expand_min_m=1 if expand else 1 << 30)


def signed_weight(w: PreparedWeight, codes):
    gid = torch.arange(w.k) // (w.group_size or w.k)
    return codes.to(torch.int64) - w.zeros.to(torch.int64)[:, gid]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize(
    ("swap", "expand"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_int32_accumulator_exact(shape, act_bits, group_size, swap, expand, monkeypatch):
    use_swap(monkeypatch, swap)
    m, n, k = shape
    w, codes = make_weight(n, k, 4, group_size, seed=m)
    xq, xs = act_codes(m, k, act_bits)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    acc = fn(xq, xs, w, debug=True, policy=expand_policy(expand))
    x_int = xq.to(torch.int64) if act_bits == 8 else unpack_ref(xq, 4, k).to(torch.int64) - 8
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), x_int @ signed_weight(w, codes).t())


@pytest.mark.parametrize("shape", [(67, 33, 200), (3, 40, 64)])
def test_fp8_epilogue_equals_the_int8_path(shape):
    """The epilogue of W4A4 on fp8 tensor cores (gemm_triton.scale_out on the exact fp32
    product of unit-scale _scaled_mm) gives the int8 path's output bit for bit: same fp32
    products in the same order, one rounding to bf16."""
    m, n, k = shape
    w, codes = make_weight(n, k, 4, None, seed=m, zeros=True)
    xq, xs = act_codes(m, k, 4)
    x_int = unpack_ref(xq, 4, k).to(torch.int64) - 8
    raw = (x_int @ signed_weight(w, codes).t()).float()  # exact: |sum| < 2^24
    got = gemm_triton.scale_out(raw, xs.reshape(m), w.scales.reshape(n), torch.bfloat16)
    assert torch.equal(got, gemm_w4a4(xq, xs, w, policy=expand_policy(True)))
    assert torch.equal(got, ((raw * w.scales.reshape(1, n)) * xs.reshape(m, 1)).bfloat16())


def max_err(got, exact):
    return float((got.double() - exact).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32, 64])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("swap", "expand"), [(False, False), (True, False), (False, True)])
def test_scaled_output_within_twice_the_torch_error(shape, act_bits, group_size, out_dtype, swap,
                                                     expand, monkeypatch):  # fmt: skip
    use_swap(monkeypatch, swap)
    m, n, k = shape
    w, _ = make_weight(n, k, 4, group_size, seed=n)
    xq, xs = act_codes(m, k, act_bits, seed=k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    out = fn(xq, xs, w, bias, out_dtype=out_dtype, policy=expand_policy(expand))
    exact = gemm_ref(xq, w, xs, act_bits, bias)
    # The same computation in PyTorch at the output dtype: fp32 math, one rounding.
    torch_out = gemm_ref(xq, w, xs, act_bits, bias, dtype=torch.float32).to(out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert max_err(out, exact) <= 2 * max_err(torch_out, exact) + 1e-6 * float(exact.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("swap", [False, True])
def test_weight_only(bits, group_size, dtype, swap, monkeypatch):
    use_swap(monkeypatch, swap)
    m, n, k = 13, 33, 100
    w, _ = make_weight(n, k, bits, group_size, seed=bits, zeros=group_size != 64)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(4))).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = gemm_wonly(x, w, bias)
    exact = gemm_ref(x, w, bias=bias)
    torch_out = (x @ w.dequantize(dtype).t() + bias).to(dtype)  # PyTorch at the same dtype
    assert out.dtype == dtype
    tol = 1e-5 * float(exact.abs().max())
    assert max_err(out, exact) <= 2 * max_err(torch_out, exact) + tol


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("swap", [False, True])
def test_split_k_partials_sum_to_the_same_result(split, swap, monkeypatch):
    use_swap(monkeypatch, swap)
    m, n, k = 3, 40, 200
    w, _ = make_weight(n, k, 4, 32)
    xq, xs = act_codes(m, k, 8)
    one = gemm_w4a8(xq, xs, w, out_dtype=torch.float32, split_k=1)
    many = gemm_w4a8(xq, xs, w, out_dtype=torch.float32, split_k=split)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    x = torch.randn(m, k)
    torch.testing.assert_close(gemm_wonly(x, w, split_k=split), gemm_wonly(x, w, split_k=1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("act_bits", [None, 8, 4])
def test_linear_dispatcher(act_bits):
    w, _ = make_weight(24, 64, 4, 32)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    y = linear(x, w, act_bits)
    assert y.shape == (2, 5, 24) and y.dtype == torch.bfloat16
    x2 = x.reshape(-1, 64)
    if act_bits is None:
        want = gemm_ref(x2, w)
    else:
        q, s = act_quant(x2, act_bits)
        want = gemm_ref(q, w, s, act_bits)
    torch.testing.assert_close(y.reshape(-1, 24).double(), want, rtol=2e-2, atol=1e-2)


def test_bad_input():
    w, _ = make_weight(8, 64, 4, None)
    xq, xs = act_codes(3, 64, 8)
    with pytest.raises(TypeError, match="x_codes must have dtype"):
        gemm_w4a8(xq.float(), xs, w)
    with pytest.raises(ValueError, match="K = 64 columns"):
        gemm_w4a8(xq[:, :32].contiguous(), xs, w)
    with pytest.raises(ValueError, match=r"x_scales must be \(M,\)"):
        gemm_w4a8(xq, xs[:2].contiguous(), w)
    with pytest.raises(ValueError, match="words per row"):
        gemm_w4a4(torch.zeros(3, 7, dtype=torch.int32), xs, w)
    with pytest.raises(TypeError, match="PreparedWeight"):
        gemm_w4a8(xq, xs, w.packed)
    w2, _ = make_weight(8, 64, 2, None)
    with pytest.raises(ValueError, match="3- or 4-bit weights"):
        gemm_w4a8(xq, xs, w2)
    with pytest.raises(ValueError, match="integer GEMMs only"):
        _launch(torch.zeros(3, 64), None, _A_FLOAT, w, None, torch.float32, True, None)
    with pytest.raises(ValueError, match="multiple of 32"):
        make_weight(8, 64, 4, 48)
    with pytest.raises(ValueError, match="zeros must be integers"):
        prepare_weight(w.packed.contiguous(), 4, 64, w.scales, torch.full((8, 1), 16.0))
    with pytest.raises(ValueError, match="words per row"):
        prepare_weight(w.packed.contiguous(), 4, 100, w.scales)
    with pytest.raises(ValueError, match="bits=8"):
        prepare_weight(w.packed.contiguous(), 8, 64, w.scales)
    with pytest.raises(ValueError, match=r"bias must be \(N,\)"):
        gemm_w4a8(xq, xs, w, torch.zeros(9))
    with pytest.raises(TypeError, match="out_dtype"):
        gemm_w4a8(xq, xs, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="act_bits"):
        linear(torch.randn(2, 64), w, 6)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_pytorch_fallback_matches_the_kernel(act_bits):
    """Without Triton's interpreter, CPU tensors take PyTorch formulas: same contracts."""
    from unittest import mock

    import cbq_kernels.gemm as gemm_module

    w, _ = make_weight(9, 40, 4, 32, seed=9)
    xq, xs = act_codes(5, 40, act_bits, seed=10)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    acc, out = fn(xq, xs, w, debug=True), fn(xq, xs, w, out_dtype=torch.float32)
    x = torch.randn(5, 40)
    wo = gemm_wonly(x, w)
    with mock.patch.object(gemm_module, "use_triton", return_value=False):
        assert torch.equal(fn(xq, xs, w, debug=True), acc)
        torch.testing.assert_close(fn(xq, xs, w, out_dtype=torch.float32), out)
        torch.testing.assert_close(gemm_wonly(x, w), wo)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_weight_only_dequantize_then_matmul_path(bits, group_size):
    """At M >= policy.wonly_cublas_min_m, gemm_wonly dequantizes to a scratch weight (Triton) and
    calls the BLAS GEMM: the scratch weight equals the PyTorch dequantization exactly."""
    from cbq_kernels.packing import dequantize_ref

    m, n, k = 5, 33, 100
    w, _ = make_weight(n, k, bits, group_size, seed=11)
    deq = gemm_module.expand_weight(w, torch.bfloat16, scaled=True)
    want = dequantize_ref(w.packed.contiguous(), bits, k, w.scales, w.zeros.float(), group_size,
                          torch.bfloat16)  # fmt: skip
    assert torch.equal(deq, want)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(13))
    out = gemm_wonly(x, w, bias, policy=GemmPolicy(wonly_cublas_min_m=1))
    exact = gemm_ref(x, w, bias=bias)
    torch_out = torch.nn.functional.linear(x, want, bias.to(torch.bfloat16))
    assert max_err(out, exact) <= 2 * max_err(torch_out, exact) + 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (4, 64), (3, 32), (2, 64)])
def test_a_weight_in_the_decode_layout_alone_serves_every_path(bits, group_size):
    """layout="decode" (what a served model holds on a GPU with the extension: one copy of the
    weight) gives the canonical weight's integer accumulators exactly and its products: the
    integer GEMMs expand it to int8 (gemm_decode.expand), the weight-only GEMM dequantizes it
    then multiplies; scales and zero points are views of the layout's own tensors."""
    n, k = 70, 192
    one, _ = make_weight(n, k, bits, group_size, seed=31, layout="decode")
    canon, _ = make_weight(n, k, bits, group_size, seed=31, layout="canonical")
    both, _ = make_weight(n, k, bits, group_size, seed=31, layout="both")
    assert one.words is None and one.decode is not None
    assert one.scales.untyped_storage().data_ptr() == one.decode.scales.untyped_storage().data_ptr()
    assert torch.equal(one.scales, canon.scales) and torch.equal(one.zeros, canon.zeros)
    assert torch.equal(one.packed, canon.packed)
    # the served weight holds one copy of the codes, scales and zero points
    assert both.nbytes - one.nbytes == canon.words.numel() * 4
    if bits != 2:  # the integer GEMMs take 3- and 4-bit weights
        for act_bits, fn in ((8, gemm_w4a8), (4, gemm_w4a4)):
            xq, xs = act_codes(5, k, act_bits, seed=32)
            assert torch.equal(fn(xq, xs, one, debug=True), fn(xq, xs, canon, debug=True))
            out = fn(xq, xs, one, out_dtype=torch.float32)
            torch.testing.assert_close(out.double(), gemm_ref(xq, one, xs, act_bits),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(33))
    torch.testing.assert_close(gemm_wonly(x, one).double(), gemm_ref(x, canon), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"keeps only the decode layout.*layout='both'"):
        gemm_wonly(x, one, split_k=2)


@pytest.mark.parametrize("layout", ["canonical", "decode", "both"])
def test_the_pytorch_cpu_path_takes_every_layout(monkeypatch, layout):
    """Without Triton's interpreter the CPU GEMMs dequantize the weight (PyTorch + the compiled
    cbq::dequantize), also a weight in the decode layout, whose scales and zero points are
    transposed views (grouped: not contiguous; this path raised on them before)."""
    monkeypatch.setattr(gemm_module, "use_triton", lambda kernel, device: False)
    w, _ = make_weight(70, 192, 3, 32, seed=41, layout=layout)
    assert (w.decode is not None) == (layout != "canonical")
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(gemm_wonly(x, w).double(), gemm_ref(x, w), rtol=1e-5, atol=1e-5)
    xq, xs = act_codes(5, 192, 8, seed=43)
    out = gemm_w4a8(xq, xs, w, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), gemm_ref(xq, w, xs, 8), rtol=1e-5, atol=1e-5)


def test_gemm_ops_pass_opcheck_and_compile_with_fullgraph():
    w, _ = make_weight(33, 100, 4, 32, seed=21)
    xq, xs = act_codes(3, 100, 8)
    x4, xs4 = act_codes(3, 100, 4)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(22))
    pol = gemm_module._policy_args(gemm_module.DEFAULT_POLICY)
    wargs = gemm_module._weight_args(w)
    iargs = gemm_module._weight_args(w, True)  # the integer ops: + two-level channel scales, steps
    torch.library.opcheck(torch.ops.cbq.gemm_w4a8.default,
                          (xq, xs, *iargs, None, torch.float32, False, None, pol))  # fmt: skip
    torch.library.opcheck(torch.ops.cbq.gemm_w4a4.default,
                          (x4, xs4, *iargs, None, torch.bfloat16, True, None, pol))  # fmt: skip
    torch.library.opcheck(torch.ops.cbq.gemm_wonly.default, (x, *wargs, None, None, pol))
    codes = torch.randint(0, 16, (33, 100), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.cbq.prepare_weight.default,
                          (pack_ref(codes, 4), 4, 100, w.scales, w.zeros.float(), 32))  # fmt: skip
    compiled = torch.compile(lambda x: gemm_wonly(x, w), fullgraph=True)
    assert torch.equal(compiled(x), gemm_wonly(x, w))
    compiled = torch.compile(lambda q, s: gemm_w4a8(q, s, w, out_dtype=torch.float32),
                             fullgraph=True)  # fmt: skip
    assert torch.equal(compiled(xq, xs), gemm_w4a8(xq, xs, w, out_dtype=torch.float32))
    one, _ = make_weight(33, 100, 4, 32, seed=21, layout="decode")  # no canonical words
    torch.library.opcheck(torch.ops.cbq.gemm_wonly.default,
                          (x, *gemm_module._weight_args(one), None, None, pol))  # fmt: skip
    compiled = torch.compile(lambda x: gemm_wonly(x, one), fullgraph=True)
    assert torch.equal(compiled(x), gemm_wonly(x, one))


def test_gemm_policy_is_checked():
    with pytest.raises(ValueError, match=r"GemmPolicy\.small_m must be a non-negative int"):
        GemmPolicy(small_m=-1)
    with pytest.raises(ValueError, match="decode_max_m must be <= 16"):
        GemmPolicy(decode_max_m=32)
    with pytest.raises(ValueError, match="tiles_max_m must be <= 64"):
        GemmPolicy(tiles_max_m=65)
    with pytest.raises(ValueError, match=r"gluon_min_m \(8192\) must be <= gluon_max_m"):
        GemmPolicy(gluon_min_m=8192)
    with pytest.raises(ValueError, match="decode_mtiles must be 1 or 2, got 4"):
        GemmPolicy(decode_mtiles=4)
    with pytest.raises(ValueError, match=r"GemmPolicy\.decode_pdl must be a bool, got 1"):
        GemmPolicy(decode_pdl=1)
    with pytest.raises(ValueError, match=r"GemmPolicy\.prologue_pdl must be a bool, got 0"):
        GemmPolicy(prologue_pdl=0)
    for pol in (GemmPolicy(decode_pdl=True, decode_mtiles=2),  # through the ops' ints
                GemmPolicy(decode_pdl=False, decode_mtiles=1, small_m=40, prologue_pdl=True,
                           gluon_min_m=2048)):
        assert gemm_module._policy_from(gemm_module._policy_args(pol)) == pol
    w, _ = make_weight(8, 64, 4)
    with pytest.raises(TypeError, match="policy must be a GemmPolicy or None, got dict"):
        gemm_wonly(torch.randn(2, 64), w, policy={"small_m": 1})


def two_level_weight(n, k, seed, layout):
    """A weight in the two-level grouped format (groups of 64) from quant_math's quantizer,
    stored canonically (scales s1 s2), prepared with its channel scales."""
    from cbq_kernels.quant_math import quantize_weight_two_level

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 5] = 0.5  # an outlier row: few int8 levels in the rest of it
    codes, s1, s2, z = quantize_weight_two_level(w, 64)
    prepared = prepare_weight(pack_ref(codes, 4), 4, k, s1[:, None] * s2.float(), z.float(), 64,
                              layout=layout, channel_scales=s1)  # fmt: skip
    return prepared, codes, s1, s2, z


@pytest.mark.parametrize("layout", ["canonical", "decode"])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_two_level_weight_at_prefill_is_the_per_channel_int8_product(layout, act_bits):
    """prepare_weight(channel_scales=s1): at prefill M the integer GEMMs expand the weight to
    the int8 values s2 (q - z) (from either layout) and run the per-channel product scaled by
    s1, bit for bit ((acc * s1[n]) * xs[m], one rounding to bf16; the exact int32 sums with
    debug), bias included; below expand_min_m the grouped kernel's float rescale per group,
    within the usual tolerance of the dequantized weight; concat_weights keeps the format."""
    n, k, m = 70, 256, 67
    w, codes, s1, s2, z = two_level_weight(n, k, 51, layout)
    assert (w.words is None) == (layout == "decode") and w.steps is not None
    gid = torch.arange(k) // 64
    w8 = s2[:, gid].to(torch.int64) * (codes.to(torch.int64) - z[:, gid])
    assert int(w8.abs().max()) <= 127
    xq, xs = act_codes(m, k, act_bits, seed=52)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    x_int = xq.to(torch.int64) if act_bits == 8 else unpack_ref(xq, 4, k).to(torch.int64) - 8
    acc = x_int @ w8.t()
    assert torch.equal(fn(xq, xs, w, debug=True).to(torch.int64), acc)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(53))
    want = (acc.float() * s1[None, :]) * xs[:, None] + bias[None, :]
    assert torch.equal(fn(xq, xs, w, bias), want.to(torch.bfloat16))
    small = fn(xq[:5], xs[:5], w, out_dtype=torch.float32)
    torch.testing.assert_close(small.double(), gemm_ref(xq[:5], w, xs[:5], act_bits),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # (the decode layout: every weight but the last fills its 64-column tiles)
    both = concat_weights([two_level_weight(64, k, 54, layout)[0], w])
    assert both.steps is not None and both.channel_scales.shape == (64 + n,)
    assert torch.equal(fn(xq, xs, both, debug=True)[:, 64:].to(torch.int64), acc)
    assert torch.equal(fn(xq, xs, both, bias.repeat(2)[: 64 + n])[:, 64:],
                       fn(xq, xs, w, bias.repeat(2)[64 : 64 + n]))  # fmt: skip


def test_two_level_weight_is_checked():
    """prepare_weight's channel_scales: a clear error for a weight that is not two-level."""
    w, codes, s1, s2, z = two_level_weight(8, 128, 55, "canonical")
    packed, scales = pack_ref(codes, 4), s1[:, None] * s2.float()
    with pytest.raises(ValueError, match=r"channel_scales must be a float tensor \(8,\)"):
        prepare_weight(packed, 4, 128, scales, z.float(), 64, channel_scales=s1[:4])
    with pytest.raises(ValueError, match=r"integer steps in 1\.\.16"):
        prepare_weight(packed, 4, 128, scales * 1.3, z.float(), 64, channel_scales=s1)
    with pytest.raises(ValueError, match=r"integer steps in 1\.\.16"):
        prepare_weight(packed, 4, 128, scales, z.float(), 64, channel_scales=s1 / 20)
    with pytest.raises(ValueError, match="needs 4-bit codes in groups that tile K"):
        prepare_weight(packed, 4, 128, scales[:, :1], z.float()[:, :1], 128, channel_scales=s1)
    big = torch.full_like(s2, 16)  # 16 (15 - 0) leaves int8
    with pytest.raises(ValueError, match=r"s2 \(q - z\) leaves int8"):
        prepare_weight(pack_ref(torch.full_like(codes, 15), 4), 4, 128, s1[:, None] * big,
                       torch.zeros_like(z).float(), 64, channel_scales=s1)  # fmt: skip
    assert w.nbytes > make_weight(8, 128, 4, 64, layout="canonical")[0].nbytes
