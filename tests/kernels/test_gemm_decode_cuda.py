"""The CUDA decode kernel (csrc/gemm_decode.cu) on the GPU: exact int32 accumulators for
W4A8 / W4A4 (bf16 MMA on integer codes, K up to 28672), weight-only W4A16 / W3A16 / W2A16
within twice PyTorch's own error, every split of K deterministic and equal."""

import pytest
import torch

from cbq_kernels import gemm_decode
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import gemm_ref, gemm_w4a4, gemm_w4a8, gemm_wonly, linear
from cbq_kernels.packing import dequantize_ref
from cbq_kernels.packing import unpack_ref as unpack
from tests.kernels.test_gemm_cuda import make_weight as gemm_cuda_weight

pytestmark = pytest.mark.cuda

# (M, N, K): 70B gate/up at M = 1, 7B attention at M = 16, 70B down (K = 28672) at M = 4,
# odd sizes (N not a multiple of the tile, K not of 16), M = 8 / 9 on either side of the
# swapped-operand kernel (M <= 8), N odd (the decode-epilogue variant stores 4 columns per thread)
SHAPES = ((1, 28672, 8192), (16, 4096, 4096), (4, 8192, 28672), (7, 1000, 200), (8, 1000, 200),
          (9, 1000, 200), (5, 1003, 200))


def need_kernel():
    if not gemm_decode.available(torch.device("cuda")):
        pytest.fail("cbq_kernels._C lacks gemm_decode_cuda: build with scripts/gpu_check.sh")


def make_weight(n, k, bits, group_size, seed=0):
    # with the canonical words: gemm_ref reads those, independently of the decode layout
    return gemm_cuda_weight(n, k, bits, group_size, seed, layout="both")


def exact_int(x_codes, w, codes):
    gid = torch.arange(w.k, device="cuda") // (w.group_size or w.k)
    wq = codes.double() - w.zeros.double()[:, gid]
    return (x_codes.double() @ wq.t()).round().to(torch.int64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_integer_accumulator_is_exact(shape, group_size, act_bits):
    need_kernel()
    m, n, k = shape
    if group_size is not None and k % group_size:
        group_size = 32
    w, codes = make_weight(n, k, 4, group_size, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(m, k, generator=g, device="cuda") * 3
    x[:, :64] = 1e3  # saturate some codes: |x_code| = 127 (8-bit) / 7 (4-bit)
    xq, xs = act_quant(x, act_bits)
    codes_x = xq if act_bits == 8 else unpack(xq, 4, k).to(torch.int32) - 8
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    got = fn(xq, xs, w, debug=True)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact_int(codes_x, w, codes))
    out = fn(xq, xs, w, out_dtype=torch.float32)
    want = gemm_ref(xq, w, xs, act_bits)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (4, 128), (3, 128), (2, 64),
                                                  (2, None), (2, 32)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_only_within_twice_pytorchs_error(shape, bits, group_size, dtype):
    need_kernel()
    m, n, k = shape
    if group_size is not None and k % group_size:
        group_size = 32
    w, _ = make_weight(n, k, bits, group_size, seed=4)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    out = gemm_wonly(x, w)
    assert out.dtype == dtype and out.shape == (m, n)
    exact = gemm_ref(x, w)
    deq = dequantize_ref(w.packed, bits, k, w.scales, w.zeros.float(), group_size)
    torch_out = x @ deq.to(dtype).t()
    err = (out.double() - exact).abs().max()
    torch_err = (torch_out.double() - exact).abs().max()
    assert float(err) <= 2 * float(torch_err) + 1e-6 * float(exact.abs().max())


@pytest.mark.parametrize("act_bits", [None, 8, 4])
def test_every_split_gives_the_same_result_and_runs_are_deterministic(act_bits):
    need_kernel()
    w, _ = make_weight(8192, 8192, 4, 128, seed=6)
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(3, 8192, generator=g, device="cuda").to(torch.bfloat16)
    if act_bits is None:
        args, scales = x, None
    else:
        args, scales = act_quant(x, act_bits)
    outs = {}
    for splits in (1, 2, 5, 16, 32):
        outs[splits] = gemm_decode.launch(
            args, scales, w.decode, None, torch.float32, debug=act_bits is not None, splits=splits
        )
        again = gemm_decode.launch(
            args, scales, w.decode, None, torch.float32, debug=act_bits is not None, splits=splits
        )
        assert torch.equal(outs[splits], again)  # fixed reduction order
        assert int(w.decode.counters.abs().sum()) == 0  # the semaphores are left zero
    for splits, out in outs.items():
        if act_bits is None:
            torch.testing.assert_close(out, outs[1], rtol=1e-4, atol=1e-3)
        else:
            assert torch.equal(out, outs[1]), splits


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_unaligned_and_strided_activations_match_contiguous_ones(mode):
    """Rows that are not 16-byte aligned (an offset view, an odd row stride) take the kernel's
    element-by-element loads: the same result as the vector loads of a contiguous copy."""
    need_kernel()
    w, _ = make_weight(640, 1024, 4, 128, seed=10)
    g = torch.Generator(device="cuda").manual_seed(11)
    big = torch.randn(6, 1030, generator=g, device="cuda").to(torch.bfloat16)
    x = big[:, 3:1027]  # offset by 3 elements, row stride 1030
    if mode == "bf16":
        a, xs, fn = x, None, lambda a, xs: gemm_decode.launch(a, xs, w.decode, None, torch.float32)
    else:
        bits = 8 if mode == "int8" else 4
        q, xs = act_quant(x.contiguous(), bits)
        wide = torch.zeros((6, q.shape[1] + 3), dtype=q.dtype, device="cuda")
        wide[:, 1 : 1 + q.shape[1]] = q
        a = wide[:, 1 : 1 + q.shape[1]]
        fn = lambda a, xs: gemm_decode.launch(a, xs, w.decode, None, torch.float32, debug=True)  # noqa: E731
    assert a.stride(-1) == 1 and not a.is_contiguous()
    assert torch.equal(fn(a, xs), fn(a.contiguous(), xs))


def test_bias_output_dtypes_and_the_dispatch():
    need_kernel()
    w, _ = make_weight(1000, 512, 4, None, seed=8)
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(5, 512, generator=g, device="cuda").to(torch.bfloat16)
    bias = torch.randn(1000, generator=g, device="cuda")
    xq, xs = act_quant(x, 8)
    want = gemm_ref(xq, w, xs, 8, bias)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = gemm_w4a8(xq, xs, w, bias, out_dtype=dtype)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    # the Triton decode kernel (split_k forced) and the CUDA kernel agree
    torch.testing.assert_close(
        gemm_w4a8(xq, xs, w, bias, split_k=1).float(),
        gemm_w4a8(xq, xs, w, bias).float(),
        rtol=1e-2,
        atol=1e-2,
    )
    y = linear(x, w, act_bits=None, bias=bias)
    torch.testing.assert_close(y.double(), gemm_ref(x, w, bias=bias), rtol=2e-2, atol=2e-2)


# (weight bits, group size, activations: a float dtype, or 8 / 4 for integer codes)
MTILE_CASES = ((4, 128, torch.bfloat16), (4, None, torch.float16), (2, 64, torch.bfloat16),
               (4, None, 8), (4, 128, 8), (4, None, 4))


@pytest.mark.parametrize("m", [17, 24, 32])
@pytest.mark.parametrize(("bits", "group_size", "a"), MTILE_CASES)
@pytest.mark.parametrize("splits", [1, 3, 9])  # 9: two batches of partials (decode-epilogue)
def test_two_m_tiles_equal_two_launches(m, bits, group_size, a, splits):
    """M = 17..32 in one launch of the two-m-tile kernel (MT = 2: each weight chunk read once
    for both 16-row tiles) equals, bit for bit, the same rows in two 16-row launches of the
    one-m-tile kernel with the same K splits (the second padded to 16 rows, so that neither
    runs the swapped-operand kernel): each m-tile adds the same MMA results in the same order
    (also the debug int32 accumulators, and the bias and output dtype in the epilogue)."""
    need_kernel()
    from cbq_kernels import _C  # type: ignore[attr-defined]

    assert _C.decode_max_m() == 32 and _C.decode_ws_rows(m) == 32
    n, k = 1000, 4160  # N not a multiple of the 64-column tile, K of 128 but not of 4096
    w, _ = gemm_cuda_weight(n, k, bits, group_size, seed=21, layout="auto")
    g = torch.Generator(device="cuda").manual_seed(22)
    x = torch.randn(m, k, generator=g, device="cuda")
    bias = torch.randn(n, generator=g, device="cuda")
    if isinstance(a, int):
        xq, xs = act_quant(x, a)
        runs = [(xq, xs, True, torch.float32), (xq, xs, False, torch.bfloat16)]
    else:
        runs = [(x.to(a), None, False, a)]
    for xin, xs, debug, out_dtype in runs:
        b = None if debug else bias
        one = gemm_decode.launch(xin, xs, w.decode, b, out_dtype, debug, splits=splits, mtiles=2)
        pad = lambda t: torch.cat([t[16:], t[:16][: 32 - m]])  # noqa: E731 (rows 16.., then 16 rows)
        top = gemm_decode.launch(xin[:16], None if xs is None else xs[:16], w.decode, b,
                                 out_dtype, debug, splits=splits)  # fmt: skip
        rest = gemm_decode.launch(pad(xin), None if xs is None else pad(xs), w.decode, b,
                                  out_dtype, debug, splits=splits)[: m - 16]  # fmt: skip
        two = torch.cat([top, rest])
        assert one.dtype == two.dtype and torch.equal(one, two), (debug, out_dtype)
    # the counters are left zero (the split reduction's semaphores)
    assert int(w.decode.counters.abs().sum()) == 0


@pytest.mark.parametrize("m", [17, 40, 64])
@pytest.mark.parametrize("act_bits", [None, 8, 4])
def test_rows_beyond_16_on_a_weight_in_the_decode_layout_alone(m, act_bits):
    """A served weight (layout "auto": the decode layout alone) at 16 < M <= 64: the CUDA
    kernel on 32-row launches of two m-tiles (the default) or on 16-row slices and the
    Triton kernel reading the layout once
    (GemmPolicy.tiles_max_m) give the exact int32 accumulators, and weight-only products
    within twice PyTorch's error."""
    need_kernel()
    from cbq_kernels.gemm_triton import GemmPolicy

    w, codes = gemm_cuda_weight(4096, 11008, 4, 128, seed=12, layout="auto")
    assert w.words is None
    tiles = GemmPolicy(tiles_max_m=64)
    mtiles = GemmPolicy(decode_mtiles=2)  # 32-row launches of the two-m-tile kernel
    slices = GemmPolicy(decode_mtiles=1)  # 16-row slices
    g = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(m, 11008, generator=g, device="cuda").to(torch.bfloat16)
    if act_bits is None:
        exact = gemm_ref(x, w)
        deq = dequantize_ref(w.packed, 4, 11008, w.scales, w.zeros.float(), 128)
        torch_err = float((x @ deq.to(torch.bfloat16).t()).double().sub(exact).abs().max())
        for policy in (None, tiles, mtiles, slices):
            err = float((gemm_wonly(x, w, policy=policy).double() - exact).abs().max())
            assert err <= 2 * torch_err + 1e-6 * float(exact.abs().max()), policy
        return
    xq, xs = act_quant(x, act_bits)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    codes_x = xq if act_bits == 8 else unpack(xq, 4, 11008).to(torch.int32) - 8
    want = exact_int(codes_x, w, codes)
    for policy in (None, tiles, mtiles, slices):
        assert torch.equal(fn(xq, xs, w, debug=True, policy=policy).long(), want), policy


@pytest.mark.parametrize(("m", "bits", "group_size", "a"), [
    (1, 4, 128, "bf16"), (4, 4, None, "int8"), (16, 4, 128, "int8"), (7, 4, None, "int4"),
    (3, 2, 64, "fp16"), (32, 4, 128, "bf16")])  # fmt: skip
def test_programmatic_dependent_launch_gives_the_same_bits(m, bits, group_size, a):
    """GemmPolicy(decode_pdl=True): the kernel launched with programmatic dependent launch
    (its weight prefetch before griddepcontrol.wait) gives the launches without it bit for
    bit, eagerly and replayed in a CUDA graph of back-to-back GEMMs (where the overlap
    happens), also with split-K's workspace and counters shared by the chain."""
    need_kernel()
    from cbq_kernels.gemm_triton import GemmPolicy

    n, k = 4096, 4096
    w, _ = gemm_cuda_weight(n, k, bits, group_size, seed=31, layout="auto")
    g = torch.Generator(device="cuda").manual_seed(32)
    x = torch.randn(m, k, generator=g, device="cuda").to(
        torch.float16 if a == "fp16" else torch.bfloat16)  # fmt: skip
    pdl = GemmPolicy(decode_pdl=True, decode_mtiles=2 if m > 16 else 1)
    plain = GemmPolicy(decode_pdl=False, decode_mtiles=pdl.decode_mtiles)
    if a in ("bf16", "fp16"):
        run = lambda policy: gemm_wonly(x, w, policy=policy)  # noqa: E731
    else:
        xq, xs = act_quant(x, 8 if a == "int8" else 4)
        fn = gemm_w4a8 if a == "int8" else gemm_w4a4
        run = lambda policy: fn(xq, xs, w, debug=True, policy=policy)  # noqa: E731
    want = run(plain)
    assert torch.equal(run(pdl), want)
    chain = lambda: [run(pdl) for _ in range(4)]  # noqa: E731
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        assert torch.equal(out, want)
    assert int(w.decode.counters.abs().sum()) == 0


@pytest.mark.parametrize(("m", "a", "norm"), [(1, 8, True), (4, 4, False), (16, 8, False),
                                              (1, None, True), (16, None, True)])  # fmt: skip
def test_prologue_launched_with_pdl_gives_the_same_bits(m, a, norm):
    """GemmPolicy(prologue_pdl=True): the kernel in front of the decode GEMM (the activation
    quantizer; for a weight-only GEMM the RMSNorm kernel) launched with programmatic dependent
    launch, letting the GEMM launch at its start: the layer chain (its output the next layer's
    input) gives the plain launches' bits, eagerly and replayed in a CUDA graph (where the
    launches overlap)."""
    need_kernel()
    from cbq_kernels.gemm_triton import GemmPolicy
    from cbq_kernels.rmsnorm import rms_norm

    n = k = 4096
    w, _ = gemm_cuda_weight(n, k, 4, None if a else 128, seed=41, layout="auto")
    g = torch.Generator(device="cuda").manual_seed(42)
    x0 = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    nw = torch.rand(k, generator=g, device="cuda") + 0.5
    kwargs = {"norm_weight": nw} if norm and a else {}
    pdl, plain = GemmPolicy(prologue_pdl=True), GemmPolicy(prologue_pdl=False)

    def chain(policy, layers=4):
        x, outs = x0, []
        for _ in range(layers):
            if a is None:  # weight-only: the RMSNorm kernel in front of the GEMM
                x = rms_norm(x, nw.to(x.dtype), 1e-5, pdl=policy.prologue_pdl)
            y = linear(x, w, a, policy=policy, **kwargs)
            outs.append(y)
            x = (y.float() / y.float().abs().amax().clamp_min(1e-6)).to(torch.bfloat16)
        return outs

    want = chain(plain)
    for got, ref in zip(chain(pdl), want, strict=True):
        assert torch.equal(got, ref)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(pdl)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(pdl)
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(outs, want, strict=True):
        assert torch.equal(got, ref)
