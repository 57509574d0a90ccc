"""The decode kernel's weight layout on the CPU: the layout read back through the PTX fragment
layouts of mma.m16n8k16 (bf16 activations) and mma.m16n8k32 (s8 codes), with the kernel's byte
permutes (cbq_kernels.gemm_decode.emulate), gives the reference product; the CUDA kernel itself
is tested on the GPU (test_gemm_decode_cuda.py)."""

from pathlib import Path

import pytest
import torch

from cbq_kernels.act_quant import act_quant
from cbq_kernels.gemm import gemm_ref, prepare_weight
from cbq_kernels.gemm_decode import (
    chunk_k,
    emulate,
    expand,
    launch_triton,
    prepare_decode,
    tile_n,
    unpack_codes,
)
from cbq_kernels.packing import pack_ref, unpack_ref

# (bits, N, K, group_size, M): N not a multiple of the tile, K not of the chunk (odd too), M
# from 1 to 16; 2-bit with groups of 32 lives in 4-bit containers
CASES = [(4, 70, 48, None, 1), (4, 130, 96, 32, 16), (3, 64, 34, None, 5), (2, 200, 192, 64, 1),
         (2, 129, 35, None, 2), (4, 65, 160, 32, 13), (2, 128, 64, 32, 16)]  # fmt: skip


def make(bits, n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if group_size is None else -(-k // group_size)
    scales = torch.rand(n, groups, generator=g) + 0.5
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).float()
    return codes, scales, zeros


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), CASES)
def test_layout_through_the_mma_fragments_is_the_reference_product(bits, n, k, group_size, m):
    codes, scales, zeros = make(bits, n, k, group_size)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    tn, ck = tile_n(dw.bits), chunk_k(dw.bits)
    assert dw.bits == (2 if bits == 2 and group_size != 32 else 4)
    assert dw.words.shape == (-(-n // tn), -(-k // ck), 2, 32, 4) and dw.n_pad % tn == 0
    if group_size is None:  # gemm_ref's weight from the same codes (per channel)
        weight = prepare_weight(pack_ref(codes, bits), bits, k, scales, zeros, layout="canonical")
        x = torch.randn(m, k, dtype=torch.float64)
        want = gemm_ref(x, weight)
        torch.testing.assert_close(emulate(x, dw), want, rtol=1e-10, atol=1e-10)
    gid = torch.arange(k) // (group_size or k)
    wq = (codes.double() - zeros.double()[:, gid]) * scales.double()[:, gid]
    x = torch.randn(m, k, dtype=torch.float64)
    torch.testing.assert_close(emulate(x, dw), x @ wq.t(), rtol=1e-10, atol=1e-10)


INT_CASES = [c for c in CASES if c[0] != 2]


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), INT_CASES)
@pytest.mark.parametrize("act_bits", [8, 4])
def test_integer_accumulator_is_exact(bits, n, k, group_size, m, act_bits):
    codes, scales, zeros = make(bits, n, k, group_size, seed=3)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    lim = 127 if act_bits == 8 else 7
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-lim - (act_bits == 4), lim + 1, (m, k), generator=g)
    x[:, :3] = -lim - (act_bits == 4)  # the extreme codes: -127 / -8
    xk = x.to(torch.int8) if act_bits == 8 else pack_ref((x + 8).to(torch.uint8), 4)
    gid = torch.arange(k) // (group_size or k)
    want = x.long() @ (codes.long() - zeros.long()[:, gid]).t()
    assert torch.equal(emulate(xk, dw, debug=True), want)
    xs = torch.rand(m, dtype=torch.float64)
    wq = (codes.double() - zeros.double()[:, gid]) * scales.double()[:, gid]
    torch.testing.assert_close(emulate(xk, dw, x_scales=xs), (x.double() * xs[:, None]) @ wq.t())


def test_a_wrong_layout_would_be_caught():
    """The emulator reads the words through the instructions' layouts, not prepare_decode's
    indexing: swapping two lanes' words changes its product."""
    codes, scales, zeros = make(4, 64, 64, None, seed=5)
    dw = prepare_decode(codes, scales, zeros, 4, None)
    x = torch.randn(3, 64, dtype=torch.float64)
    good = emulate(x, dw)
    words = dw.words.clone()
    words[:, :, :, [0, 1]] = words[:, :, :, [1, 0]]
    bad = emulate(x, type(dw)(words, dw.scales, dw.zeros, dw.counters, dw.bits, dw.n, dw.k,
                              dw.group_size))  # fmt: skip
    assert not torch.allclose(good, bad)


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), CASES)
def test_the_layout_expands_back_to_the_codes_and_the_dequantized_weight(bits, n, k, group_size,
                                                                         m):  # fmt: skip
    """unpack_codes inverts prepare_decode; the Triton expansion (int8 q - z, fp8, and the
    dequantized weight in fp32 / bf16) equals the PyTorch formulas exactly."""
    codes, scales, zeros = make(bits, n, k, group_size, seed=m)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    assert torch.equal(unpack_codes(dw), codes)
    gid = torch.arange(k) // (group_size or k)
    wq = codes.to(torch.int32) - zeros.to(torch.int32)[:, gid]
    assert torch.equal(expand(dw).to(torch.int32), wq)
    assert torch.equal(expand(dw, torch.float8_e4m3fn).float(), wq.float())
    deq = wq.float() * scales[:, gid]
    assert torch.equal(expand(dw, torch.float32, scaled=True), deq)
    assert torch.equal(expand(dw, torch.bfloat16, scaled=True), deq.to(torch.bfloat16))


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), CASES)
@pytest.mark.parametrize("rows", [0, 17, 47])
def test_the_triton_kernel_on_the_layout_reads_it_for_every_row(bits, n, k, group_size, m, rows):
    """gemm_decode.launch_triton (the decode layout's product for M up to 64, the weight read
    once): exact int32 accumulators for int8 and packed int4 codes (any split of K), the
    scaled outputs and the weight-only product against fp64."""
    m = m + rows
    codes, scales, zeros = make(bits, n, k, group_size, seed=m)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    gid = torch.arange(k) // (group_size or k)
    wq = codes.double() - zeros.double()[:, gid]
    deq = wq * scales.double()[:, gid]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = launch_triton(x, None, dw, None, torch.float32, splits=2)
    torch.testing.assert_close(y.double(), x.double() @ deq.t(), rtol=1e-5, atol=1e-4)
    if bits == 2:
        return  # the integer GEMMs take 3- and 4-bit weights
    for act_bits in (8, 4):
        xq, xs = act_quant(x, act_bits)
        xc = xq.double() if act_bits == 8 else unpack_ref(xq, 4, k).double() - 8
        for splits in (1, 3):
            acc = launch_triton(xq, xs, dw, None, torch.float32, debug=True, splits=splits)
            assert acc.dtype == torch.int32 and torch.equal(acc.double(), xc @ wq.t())
        out = launch_triton(xq, xs, dw, torch.ones(n), torch.float32)
        want = (xc * xs.double()[:, None]) @ deq.t() + 1
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


def test_padding_is_zero_codes_scales_and_zero_points():
    codes, scales, zeros = make(4, 70, 40, None)
    dw = prepare_decode(codes, scales, zeros, 4, None)
    assert dw.n_pad == 128 and torch.equal(dw.scales[:, 70:], torch.zeros(1, 58))
    assert torch.equal(dw.zeros[:, 70:], torch.zeros(1, 58, dtype=torch.int32))
    assert torch.equal(dw.counters, torch.zeros(2, dtype=torch.int32))


def test_the_layout_is_built_on_request_and_checks_groups():
    codes, scales, zeros = make(4, 16, 48, None)
    w = prepare_weight(pack_ref(codes, 4), 4, 48, scales, zeros, layout="both")
    assert w.decode is not None and w.decode.k == 48 and w.decode.n == 16
    assert w.words is not None
    auto = prepare_weight(pack_ref(codes, 4), 4, 48, scales, zeros)  # CPU: no CUDA kernel
    assert auto.decode is None and auto.words is not None
    codes, scales, zeros = make(4, 16, 96, 16)
    with pytest.raises(ValueError, match="groups that are multiples of 32, got group_size=16"):
        prepare_decode(codes, scales, zeros, 4, 16)


@pytest.mark.parametrize(("bits", "group_size", "layout"),
                         [(4, None, "both"), (4, 32, "decode"), (2, 64, "both"),
                          (3, None, "canonical")])  # fmt: skip
def test_concatenated_weights_are_the_weight_of_the_concatenated_codes(bits, group_size,
                                                                         layout):  # fmt: skip
    """concat_weights of q / k / v-like weights (N 128, 64, 70: the last one padded in the
    decode layout) holds exactly the layouts prepare_weight builds from the stacked codes."""
    from cbq_kernels.gemm_weight import concat_weights

    k = 96
    made = [make(bits, n, k, group_size, seed=n) for n in (128, 64, 70)]
    parts = [prepare_weight(pack_ref(c, bits), bits, k, s, z, group_size, layout=layout)
             for c, s, z in made]  # fmt: skip
    whole = prepare_weight(pack_ref(torch.cat([c for c, _, _ in made]), bits), bits, k,
                           torch.cat([s for _, s, _ in made]), torch.cat([z for _, _, z in made]),
                           group_size, layout=layout)  # fmt: skip
    got = concat_weights(parts)
    assert got.n == whole.n == 262 and got.k == k
    assert torch.equal(got.scales, whole.scales) and torch.equal(got.zeros, whole.zeros)
    if layout != "decode":
        assert torch.equal(got.words, whole.words)
    if layout != "canonical":
        for f in ("words", "scales", "zeros", "counters"):
            assert torch.equal(getattr(got.decode, f), getattr(whole.decode, f)), f
        assert (got.decode.n, got.decode.bits) == (whole.decode.n, whole.decode.bits)


def test_concat_weights_refuses_what_cannot_be_one_weight():
    from cbq_kernels.gemm_weight import concat_weights

    c, s, z = make(4, 70, 64, None)
    a = prepare_weight(pack_ref(c, 4), 4, 64, s, z, layout="decode")
    with pytest.raises(ValueError, match="every weight but the last needs N a multiple of 64"):
        concat_weights([a, a])
    b = prepare_weight(pack_ref(c, 4), 4, 64, s, z, layout="canonical")
    with pytest.raises(ValueError, match="differ in bits, K, groups, device, kept layouts"):
        concat_weights([a, b])
    with pytest.raises(ValueError, match="at least one weight"):
        concat_weights([])


def test_the_split_model_picks_the_measured_best_splits(monkeypatch):
    """default_splits on 132 SMs against the sweep of the committed kernel (H200, 132 SMs;
    benchmarks/results/h200/sweep_decode_blocks4_b006aa3/fit.txt: 7B q/k/v/o and gate/up,
    70B gate/up; W4A16 g128, W4A8, W2A16 g128; M = 1 / 16 / 32, every split timed): for every
    one of the 27 rows the model's split is within 6% of the row's best time. The rows it
    has to get right differ: 7B q/k/v/o wants S = 8 at M = 1 and 16 (W4A16 M = 16: 10.5 us,
    S = 1 23.4) but S = 4 at M = 32; 70B gate/up wants S = 1 at M = 16 for W4A16 too since
    its instance fits 4 blocks per SM (68.8 us; S = 2 77.1), where at 3 blocks S = 2-4 won."""
    from cbq_kernels import gemm_decode
    from cbq_kernels.testing import LLAMA_LINEAR_SHAPES

    path = (Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h200" /
            "sweep_decode_blocks4_b006aa3" / "fit.txt")  # fmt: skip
    splits = (1, 2, 3, 4, 6, 8, 12, 16, 24)
    monkeypatch.setattr(gemm_decode, "_sm_count", lambda index: 132)
    gemm_decode.default_splits.cache_clear()
    rows = 0
    try:
        for line in path.read_text().splitlines():
            if line.startswith(("#", "shape")) or "|" not in line:
                continue
            head, times = line.split("|")[:2]
            shape, kind, m = head.split()[:3]
            model, layer = shape.split("_", 1)
            n, k = LLAMA_LINEAR_SHAPES[model][layer]
            ck = chunk_k(2 if kind.startswith("w2") else 4)
            got = gemm_decode.default_splits(-(-n // tile_n(4)), k // ck, torch.device("cpu"),
                                             int(m), kind == "w4a8")  # fmt: skip
            t = dict(zip(splits, (float(v) for v in times.split()), strict=True))
            assert t[got] <= 1.06 * min(t.values()), (shape, kind, m, got, t)
            rows += 1
    finally:
        gemm_decode.default_splits.cache_clear()
    assert rows == 27
