"""Inference GEMMs on the GPU at real shapes (the CPU contracts, at Llama sizes)."""

import pytest
import torch

from cbq_kernels import gemm_triton as gemm_module
from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import (
    _A_FLOAT,
    _A_INT4,
    _A_INT8,
    _launch,
    gemm_ref,
    gemm_w4a4,
    gemm_w4a8,
    gemm_wonly,
    linear,
    prepare_weight,
)
from cbq_kernels.packing import dequantize_ref
from cbq_kernels.packing import pack_ref as pack  # no compiled extension needed
from cbq_kernels.packing import unpack_ref as unpack

pytestmark = pytest.mark.cuda

# (M, N, K): decode and prefill sizes at Llama-2 shapes (70B gate/up, 7B gate/up, 70B kv);
# M = 40: the decode kernel on 16-row slices when the weight has only the decode layout
SHAPES = ((1, 28672, 8192), (13, 1024, 8192), (40, 4096, 4096), (67, 11008, 4096),
          (4096, 4096, 4096))
# "auto": the served weight (the decode layout alone, every M from it), "both": with the
# canonical words the Triton kernels read (M = 17..63 unpacked in the K loop, larger M
# expanded from those words)
LAYOUTS = ("auto", "both")


def make_weight(n, k, bits, group_size, seed=0, layout="auto"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda", dtype=torch.uint8)
    groups = 1 if group_size is None else -(-k // group_size)
    scales = torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 0.005
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g, device="cuda").float()
    w = prepare_weight(pack(codes, bits), bits, k, scales, zeros, group_size, layout=layout)
    return w, codes


def activations(m, k, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(m, k, generator=g, device="cuda") * 3).to(torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int32_accumulator_exact(shape, act_bits, layout):
    m, n, k = shape
    w, codes = make_weight(n, k, 4, 128, layout=layout)
    xq, xs = act_quant(activations(m, k), act_bits)
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    acc = fn(xq, xs, w, debug=True)
    x_int = xq.double() if act_bits == 8 else unpack(xq, 4, k).double() - 8
    gid = torch.arange(k, device="cuda") // 128
    w_int = codes.double() - w.zeros.double()[:, gid]
    # fp64 products and sums of these integers are exact (|sum| < 127 * 15 * K < 2**53).
    assert torch.equal(acc.double(), x_int @ w_int.t())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 128])
def test_scaled_output(shape, act_bits, group_size):
    m, n, k = shape
    w, _ = make_weight(n, k, 4, group_size, seed=2)
    xq, xs = act_quant(activations(m, k, seed=3), act_bits)
    bias = torch.randn(n, device="cuda")
    out = (gemm_w4a8 if act_bits == 8 else gemm_w4a4)(xq, xs, w, bias)
    exact = gemm_ref(xq, w, xs, act_bits, bias)
    torch_out = gemm_ref(xq, w, xs, act_bits, bias, dtype=torch.float32).to(torch.bfloat16)
    err = (out.double() - exact).abs().max()
    torch_err = (torch_out.double() - exact).abs().max()
    assert float(err) <= 2 * float(torch_err) + 1e-6 * float(exact.abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_only(shape, bits, group_size, layout):
    m, n, k = shape
    w, _ = make_weight(n, k, bits, group_size, seed=4, layout=layout)
    x = activations(m, k, seed=5)
    out = gemm_wonly(x, w)
    exact = gemm_ref(x, w)
    torch_out = x @ dequantize_ref(w.packed, bits, k, w.scales, w.zeros.float(), group_size).t()
    err = (out.double() - exact).abs().max()
    torch_err = (torch_out.double() - exact).abs().max()
    assert float(err) <= 2 * float(torch_err) + 1e-6 * float(exact.abs().max())


def test_split_k_matches_one_slice():
    w, _ = make_weight(28672, 8192, 4, 128, seed=6, layout="both")
    x = activations(1, 8192, seed=7)
    xq, xs = act_quant(x, 8)
    for fn, args in ((gemm_w4a8, (xq, xs, w)), (gemm_wonly, (x, w))):
        one = fn(*args, split_k=1)
        many = fn(*args, split_k=4)
        torch.testing.assert_close(many.float(), one.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("act_bits", [None, 8, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear(act_bits, layout):
    w, _ = make_weight(4096, 4096, 4, 128, seed=8, layout=layout)
    for m in (1, 33, 300, 2048):  # decode, decode slices or the Triton kernel, expanded
        assert_linear(activations(m, 4096, seed=m), w, act_bits)


def assert_linear(x, w, act_bits):
    """linear(x, w, act_bits) against gemm_ref of the same activation codes, within 2%."""
    y = linear(x, w, act_bits)
    if act_bits is None:
        want = gemm_ref(x, w)
    else:
        q, s = act_quant(x, act_bits)
        want = gemm_ref(q, w, s, act_bits)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max(),
                               msg=lambda e: f"M = {x.shape[0]}: {e}")  # fmt: skip


CONFIG_LISTS = {
    "large": gemm_module._LARGE_CONFIGS,
    "expanded": gemm_module._EXPANDED_CONFIGS,
    "small": gemm_module._SMALL_CONFIGS,
}


@pytest.mark.parametrize("which", list(CONFIG_LISTS))
@pytest.mark.parametrize("act_bits", [8, 4, None])
def test_every_autotuner_config(which, act_bits):
    """Each configuration the autotuner may pick, run directly: exact int32 accumulators for
    the integer kernels, the weight-only product within twice PyTorch's error."""
    if which == "expanded" and act_bits is None:
        pytest.skip("weight-only GEMMs are not expanded")
    m = 13 if which == "small" else 200
    n, k = 1000, 1024  # N not a multiple of any tile
    w, codes = make_weight(n, k, 4, 64, seed=9, layout="canonical")
    x = activations(m, k, seed=10)
    for cfg in CONFIG_LISTS[which]:
        if 64 % cfg.kwargs["BLOCK_K"]:
            continue  # pruned for groups of 64
        meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if act_bits is None:
            out = _launch(x, None, _A_FLOAT, w, None, torch.bfloat16, False, 1, meta)
            exact = gemm_ref(x, w)
            w_deq = dequantize_ref(w.packed.contiguous(), 4, k, w.scales, w.zeros.float(), 64)
            torch_out = x @ w_deq.t().to(torch.bfloat16)
            err = (out.double() - exact).abs().max()
            assert float(err) <= 2 * float((torch_out.double() - exact).abs().max()) + 1e-3, meta
            continue
        xq, xs = act_quant(x, act_bits)
        mode = _A_INT8 if act_bits == 8 else _A_INT4
        acc = _launch(xq, xs, mode, w, None, torch.bfloat16, True, 1, meta,
                      which == "expanded")  # fmt: skip
        x_int = xq.double() if act_bits == 8 else unpack(xq, 4, k).double() - 8
        gid = torch.arange(k, device="cuda") // 64
        w_int = codes.double() - w.zeros.double()[:, gid]
        assert torch.equal(acc.double(), x_int @ w_int.t()), meta


@pytest.mark.parametrize("shape", [(2048, 4096, 4096), (4096, 8192, 28672), (2051, 1024, 4160)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_w4a4_on_fp8_tensor_cores(shape, layout):
    """From GemmPolicy.fp8_w4a4_min_m (per-channel weights, bf16 out, no bias) W4A4 runs on
    fp8 e4m3 tensor cores: its fp32 sums are the exact integer sums, so the output is the
    exact result rounded once to bf16, as the int8 path's; the policy with the threshold at 0
    keeps the int8 path. Checked in three steps, so that a failure says which one broke: the
    expanded operands, the unit-scale fp8 product (fp32 out) against int64 arithmetic, then
    the scaled bf16 output."""
    if not gemm_module.fp8_available(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores (compute capability < 8.9)")
    m, n, k = shape
    w, codes = make_weight(n, k, 4, None, seed=5, layout=layout)
    xq, xs = act_quant(activations(m, k, seed=6), 4)
    w8 = gemm_module.expand_weight(w, torch.float8_e4m3fn)
    x8 = gemm_module._expand(xq, m, k, 4, xq.shape[1], 1, None, k, z_const=8,
                             dtype=torch.float8_e4m3fn)  # fmt: skip
    w_int = codes.double() - w.zeros.double()
    x_int = unpack(xq, 4, k).double() - 8
    assert torch.equal(w8.double(), w_int) and torch.equal(x8.double(), x_int)
    one = torch.ones((), device="cuda")
    raw = torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    bad = int((raw.double() != x_int @ w_int.t()).sum())
    assert bad == 0, f"unit-scale fp8 product: {bad} of {raw.numel()} sums inexact"
    fp8 = gemm_w4a4(xq, xs, w, policy=gemm_module.GemmPolicy(fp8_w4a4_min_m=1))
    int8 = gemm_w4a4(xq, xs, w)  # the default policy: the int8 path
    # the exact value from the integer sums (exact in fp64), then the two scales: a zero sum
    # stays 0. Not gemm_ref: its fp64 product of dequantized values leaves ~1e-14 where the
    # integer sum is 0, and a kernel's exact 0 then reads as 256 "half-ulps" off (H200,
    # 7a9193f: 815 of 2.1M outputs, every one such a zero; the int8 path fails that bound the
    # same way, measured on the CPU)
    exact = (x_int @ w_int.t()) * xs.double().reshape(m, 1) * w.scales.double().reshape(1, n)
    ulp = exact.abs() * 2.0**-8  # one bf16 rounding
    for name, out in (("fp8", fp8), ("int8", int8)):
        err = (out.double() - exact).abs()
        bad = int((err > ulp).sum())
        assert bad == 0, (f"{name}: {bad} of {err.numel()} outputs beyond one bf16 rounding "
                          f"(worst {float((err / ulp.clamp_min(1e-300)).max()):.2f} "
                          "half-ulps)")  # fmt: skip
    assert (fp8 != int8).float().mean() <= 1e-3  # both round the same fp32 value, or one ulp


# SmolLM2-135M's layers (fused q/k/v 960 x 576, k / v 192 x 576, fused gate/up 3072 x 576,
# down 576 x 1536): K not a multiple of 128, N not a multiple of the decode kernel's 64-column
# tile (960 = 15 x 64, 192 = 3 x 64: the tile is exact; 576 = 9 x 64), per-channel weights
# (W4A8 / W4A16 per channel are what `cbq quantize` makes by default) and a massive-activation
# channel, at every M the dispatch treats differently
@pytest.mark.parametrize(("n", "k"), [(960, 576), (192, 576), (3072, 576), (576, 1536)])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("act_bits", [None, 8, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_at_smollm2_shapes(n, k, group_size, act_bits, layout):
    w, _ = make_weight(n, k, 4, group_size, seed=11, layout=layout)
    for m in (1, 8, 16, 17, 40, 64, 300, 2048):
        x = activations(m, k, seed=m)
        x[:, 5] *= 300.0
        assert_linear(x, w, act_bits)


@pytest.mark.parametrize("act_bits", [8, 4])
def test_tma_kernel_every_config_and_the_served_call(act_bits):
    """cbq_kernels.gemm_tma on Hopper: each configuration of its autotuner exact (int32 sums,
    N not a multiple of any tile), and the served call with GemmPolicy.tma_min_m equal, bit for
    bit, to the pointer kernel's at prefill shapes (same epilogue on the same exact sums)."""
    from cbq_kernels import gemm_tma

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randint(-127, 128, (200, 1024), generator=g, device="cuda", dtype=torch.int8)
    w = torch.randint(-15, 16, (1000, 1024), generator=g, device="cuda", dtype=torch.int8)
    want = x.double() @ w.double().t()
    ones_m = torch.ones(200, device="cuda")
    ones_n = torch.ones(1000, device="cuda")
    for cfg in gemm_tma._CONFIGS:
        meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        acc = gemm_tma.gemm_int8_tma(x, ones_m, w, ones_n, None, torch.bfloat16, meta, True)
        assert torch.equal(acc.double(), want), meta
    tma = gemm_module.GemmPolicy(tma_min_m=64, gluon_min_m=0)
    pointer = gemm_module.GemmPolicy(tma_min_m=0, gluon_min_m=0)
    assert_policies_agree(act_bits, ((300, 4096, 4096), (2048, 4096, 4096), (2051, 1024, 4160)),
                          12, tma, pointer)  # fmt: skip


def assert_policies_agree(act_bits, shapes, seed, policy, reference):
    """The served W4A8 / W4A4 call with bias under ``policy`` bit-equal to the same call
    under ``reference`` at each (M, N, K) of ``shapes`` (per-channel weights, activations
    from seed + 1), and its int32 sums (debug) exact."""
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    for m, n, k in shapes:
        wt, codes = make_weight(n, k, 4, None, seed=seed)
        xq, xs = act_quant(activations(m, k, seed=seed + 1), act_bits)
        bias = torch.randn(n, device="cuda")
        want = fn(xq, xs, wt, bias, policy=reference)
        assert torch.equal(fn(xq, xs, wt, bias, policy=policy), want), (m, n, k)
        x_int = xq.double() if act_bits == 8 else unpack(xq, 4, k).double() - 8
        w_int = codes.double() - wt.zeros.double()
        assert torch.equal(fn(xq, xs, wt, debug=True, policy=policy).double(), x_int @ w_int.t())


@pytest.mark.parametrize("act_bits", [8, 4])
def test_gluon_served_call_equals_the_tma_path(act_bits, monkeypatch):
    """GemmPolicy.gluon_min_m: the served W4A8 / W4A4 call at prefill M through the Gluon int8
    kernel after expansion, bit-equal to the TMA kernel's (same epilogue on exact sums), with
    bias, a row count past every tile and K = 4160; its int32 sums exact; the first call of a
    shape inside a CUDA graph capture (nothing can be timed there: CONFIGS[0]) equal too."""
    from cbq_kernels import gemm_gluon

    if torch.cuda.get_device_capability()[0] != 9 or gemm_gluon.gluon is None:
        pytest.skip("needs Hopper and Triton's Gluon")
    gluon = gemm_module.GemmPolicy(gluon_min_m=64, tma_min_m=64, gluon_min_mn=0)
    tma = gemm_module.GemmPolicy(tma_min_m=64, gluon_min_m=0)
    calls = []  # the Gluon kernel did run (these shapes are below the default gluon_min_mn)
    launch = gemm_gluon.gemm_int8_gluon
    monkeypatch.setattr(gemm_gluon, "gemm_int8_gluon",
                        lambda *a, **kw: calls.append(a[0].shape) or launch(*a, **kw))
    assert_policies_agree(act_bits, ((300, 4096, 4096), (2051, 1024, 4160)), 14, gluon, tma)
    assert len(calls) >= 2, calls
    fn = gemm_w4a8 if act_bits == 8 else gemm_w4a4
    # a shape no call above has timed (M bucket 1024), compiled for already (M % 16 != 0)
    m, n, k = 600, 4096, 4096
    wt, _ = make_weight(n, k, 4, None, seed=16)
    xq, xs = act_quant(activations(m, k, seed=17), act_bits)
    want = fn(xq, xs, wt, policy=tma)
    fn(xq, xs, wt, policy=tma)  # warm the expansion's kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(xq, xs, wt, policy=gluon)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("layout", ["auto", "canonical"])
def test_two_level_weight_served_at_every_m(layout):
    """A two-level grouped W4A8 weight (quant_math.quantize_weight_two_level, groups of 64,
    prepare_weight's channel_scales) on the GPU: at prefill M the served call expands it to
    s2 (q - z) in int8 and its output equals the int8 TMA kernel's on that weight with the
    channel scales s1, bit for bit, with the TMA and the Gluon kernel (and the pointer kernel
    below tma_min_m), debug sums exact; at decode M (the CUDA kernel on the decode layout,
    "auto") within the grouped weight's tolerance of the reference."""
    from cbq_kernels import gemm_gluon, gemm_tma
    from cbq_kernels.quant_math import quantize_weight_two_level

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(61)
    n, k = 3000, 4096
    wf = torch.randn(n, k, generator=g, device="cuda") * 0.02
    codes, s1, s2, z = quantize_weight_two_level(wf, 64)
    w = prepare_weight(pack(codes, 4), 4, k, s1[:, None] * s2.float(), z.float(), 64,
                       layout=layout, channel_scales=s1)  # fmt: skip
    gid = torch.arange(k, device="cuda") // 64
    w8 = (s2[:, gid] * (codes.int() - z[:, gid])).to(torch.int8)
    bias = torch.randn(n, generator=g, device="cuda")
    policies = [gemm_module.GemmPolicy(gluon_min_m=0),  # the pointer kernel (M = 100)
                gemm_module.GemmPolicy(tma_min_m=64, gluon_min_m=0)]
    if gemm_gluon.gluon is not None and torch.cuda.get_device_capability()[0] == 9:
        policies.append(gemm_module.GemmPolicy(tma_min_m=64, gluon_min_m=64, gluon_min_mn=0))
    for m in (100, 2048):
        xq, xs = act_quant(activations(m, k, seed=62), 8)
        want = gemm_tma.gemm_int8_tma(xq, xs, w8, s1, bias, torch.bfloat16)
        for pol in policies:
            assert torch.equal(gemm_w4a8(xq, xs, w, bias, policy=pol), want), (m, pol)
        acc = gemm_w4a8(xq, xs, w, debug=True)
        assert torch.equal(acc.double(), xq.double() @ w8.double().t())
    for m in (1, 16):
        xq, xs = act_quant(activations(m, k, seed=63), 8)
        out = gemm_w4a8(xq, xs, w, out_dtype=torch.float32)
        torch.testing.assert_close(out.double(), gemm_ref(xq, w, xs, 8), rtol=1e-4, atol=1e-3)


def _int8_tma_reference(x, w8, g):
    """Scales and a bias drawn from ``g`` for x (M, K) and the int8 weight w8 (N, K), and the
    int8 TMA kernel's bf16 output with them: what the experimental prefill kernels, which
    share gemm_tma's epilogue, must equal bit for bit."""
    from cbq_kernels import gemm_tma

    m, n = x.shape[0], w8.shape[0]
    xs = torch.rand(m, generator=g, device="cuda") + 0.01
    ws = torch.rand(n, generator=g, device="cuda") + 0.01
    bias = torch.randn(n, generator=g, device="cuda")
    return xs, ws, bias, gemm_tma.gemm_int8_tma(x, xs, w8, ws, bias, torch.bfloat16)


def test_split_nibble_kernel_every_config():
    """cbq_kernels.gemm_tma4 on Hopper, int8 activation codes: each configuration of its
    autotuner exact with zero points (int32 sums; N and M not multiples of any tile, H = 2048
    bytes for K = 4096 and 528 for K = 1040, a partial K step), and the autotuned call's output
    bit-equal to the int8 TMA kernel's on the expanded weight. (Its fp8 form, W4A4 codes as
    e4m3, is not exact: measured on an H100 on 2026-12-06, sums off by hundreds at K = 8192;
    gemm_tma4's docstring.)"""
    from cbq_kernels import gemm_tma4

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(21)
    for m, n, k in ((200, 1000, 4096), (333, 1000, 1040)):
        x = torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
        q = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
        z = torch.randint(0, 16, (n,), generator=g, device="cuda", dtype=torch.uint8)
        w_int = q.double() - z.double()[:, None]
        want = x.double() @ w_int.t()
        split = gemm_tma4.split_nibbles(q)
        ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
        for cfg in gemm_tma4.CONFIGS:
            meta = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            acc = gemm_tma4.gemm_w4a8_split(x, ones_m, split, k, z, ones_n, config=meta,
                                            debug=True)  # fmt: skip
            assert torch.equal(acc.double(), want), (m, n, k, meta)
        expanded = (q.to(torch.int16) - z.to(torch.int16)[:, None]).to(torch.int8)
        xs, ws, bias, want = _int8_tma_reference(x, expanded, g)
        assert torch.equal(gemm_tma4.gemm_w4a8_split(x, xs, split, k, z, ws, bias),
                           want), (m, n, k)  # fmt: skip


def test_gluon_int8_kernel_every_config():
    """cbq_kernels.gemm_gluon on Hopper: each configuration exact (int32 sums; M, N and K
    tails), and its bf16 output with bias bit-equal to the TMA kernel's (same epilogue)."""
    from cbq_kernels import gemm_gluon

    if torch.cuda.get_device_capability()[0] != 9 or gemm_gluon.gluon is None:
        pytest.skip("needs Hopper and Triton's Gluon")
    g = torch.Generator(device="cuda").manual_seed(31)
    for m, n, k in ((200, 1000, 4096), (333, 1000, 1040), (2048, 4096, 4096)):
        x = torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
        w = torch.randint(-15, 16, (n, k), generator=g, device="cuda", dtype=torch.int8)
        assert gemm_gluon.available(x)
        want = x.double() @ w.double().t()
        ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
        for cfg in gemm_gluon.CONFIGS:
            acc = gemm_gluon.gemm_int8_gluon(x, ones_m, w, ones_n, None, torch.bfloat16, cfg,
                                             debug=True)  # fmt: skip
            assert torch.equal(acc.double(), want), (m, n, k, cfg)
        xs, ws, bias, want = _int8_tma_reference(x, w, g)
        assert torch.equal(gemm_gluon.gemm_int8_gluon(x, xs, w, ws, bias, torch.bfloat16), want)


def test_gluon_split_kernel_every_config():
    """cbq_kernels.gemm_gluon's W4A8 split-nibble kernel on Hopper: each configuration exact
    with zero points (int32 sums after ``- z * sum x``; M, N not multiples of any tile, K =
    4096 and 1040: H = 528 bytes, a partial K step), W4A4 codes (int8 -8..7) too, and the
    bf16 output with bias bit-equal to the int8 TMA kernel's on the expanded weight."""
    from cbq_kernels import gemm_gluon, gemm_tma4

    if torch.cuda.get_device_capability()[0] != 9 or gemm_gluon.gluon is None:
        pytest.skip("needs Hopper and Triton's Gluon")
    g = torch.Generator(device="cuda").manual_seed(41)
    for m, n, k, lo, hi in ((200, 1000, 4096, -127, 128), (333, 1000, 1040, -127, 128),
                            (300, 1000, 8192, -8, 8)):  # fmt: skip
        x = torch.randint(lo, hi, (m, k), generator=g, device="cuda", dtype=torch.int8)
        q = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
        z = torch.randint(0, 16, (n,), generator=g, device="cuda", dtype=torch.uint8)
        want = x.double() @ (q.double() - z.double()[:, None]).t()
        split = gemm_tma4.split_nibbles(q)
        ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
        for cfg in gemm_gluon.SPLIT_CONFIGS:
            acc = gemm_gluon.gemm_w4a8_split_gluon(x, ones_m, split, k, z, ones_n, config=cfg,
                                                   debug=True)  # fmt: skip
            assert torch.equal(acc.double(), want), (m, n, k, cfg)
        acc = gemm_gluon.gemm_w4a8_split_gluon(x, ones_m, split, k, None, ones_n, debug=True)
        assert torch.equal(acc.double(), x.double() @ q.double().t()), (m, n, k)
        expanded = (q.to(torch.int16) - z.to(torch.int16)[:, None]).to(torch.int8)
        xs, ws, bias, want = _int8_tma_reference(x, expanded, g)
        assert torch.equal(gemm_gluon.gemm_w4a8_split_gluon(x, xs, split, k, z, ws, bias),
                           want), (m, n, k)  # fmt: skip


def test_gluon_two_level_kernel_every_config():
    """The two-level grouped form of the same kernel (s2 (q - z) per group of 64 formed in the
    unpack, no float rescale in the K loop): each configuration with BLOCK_H = 64 exact
    against x @ (s2 (q - z))^T, and the bf16 output with bias bit-equal to the int8 TMA
    kernel's on that int8 weight."""
    from cbq_kernels import gemm_gluon, gemm_tma4

    if torch.cuda.get_device_capability()[0] != 9 or gemm_gluon.gluon is None:
        pytest.skip("needs Hopper and Triton's Gluon")
    g = torch.Generator(device="cuda").manual_seed(43)
    for m, n, k in ((200, 1000, 4096), (300, 1000, 8192)):
        x = torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8)
        q = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
        s2 = torch.randint(1, 9, (n, k // 64), generator=g, device="cuda", dtype=torch.int32)
        z = torch.randint(0, 16, (n, k // 64), generator=g, device="cuda", dtype=torch.int32)
        w8 = (s2.repeat_interleave(64, 1) * (q.to(torch.int32) - z.repeat_interleave(64, 1)))
        want = x.double() @ w8.double().t()
        split = gemm_tma4.split_nibbles(q)
        params = gemm_gluon.two_level_params(s2, z)
        ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
        for cfg in gemm_gluon.SPLIT_CONFIGS:
            if cfg[2] != 64:
                continue
            acc = gemm_gluon.gemm_w4a8_split_gluon(x, ones_m, split, k, None, ones_n, config=cfg,
                                                   debug=True, group_params=params)  # fmt: skip
            assert torch.equal(acc.double(), want), (m, n, k, cfg)
        xs, ws, bias, want = _int8_tma_reference(x, w8.to(torch.int8), g)
        assert torch.equal(gemm_gluon.gemm_w4a8_split_gluon(x, xs, split, k, None, ws, bias,
                                                            group_params=params),
                           want), (m, n, k)  # fmt: skip
