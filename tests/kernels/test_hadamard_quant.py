"""The online Hadamard transform fused with per-token quantization (cbq_kernels.hadamard_quant)
against its reference (the transform in fp32, then act_quant_ref), through Triton's
interpreter on CPU."""

import pytest
import torch

from cbq_kernels import hadamard
from cbq_kernels.hadamard_quant import hadamard_act_quant, hadamard_act_quant_ref
from cbq_kernels.packing import unpack


def data(t, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    x[:, 3] *= 200.0  # a massive-activation channel: what the rotation spreads out
    return x.to(dtype)


def assert_near(codes, scales, want_codes, want_scales, bits, n):
    """The kernel's contract (module docstring of cbq_kernels.hadamard_quant): the MMA adds in
    another order than the fp32 butterflies, so scales agree to ~1e-6 and a code differs by
    one level rarely (within ~1e-6 of a rounding boundary). A scale is one row maximum of
    sums of n fp32 terms added in two orders: 1.06e-6 apart at n = 256 (measured), so 1e-5."""
    torch.testing.assert_close(scales, want_scales, rtol=1e-5, atol=0)
    q = codes.long() if bits == 8 else unpack(codes, 4, n).long()
    qw = want_codes.long() if bits == 8 else unpack(want_codes, 4, n).long()
    diff = (q - qw).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, q.numel() // 500)


# powers of two: one Sylvester factor (16, 64), two (256 = 16 x 16, 1024 = 32 x 32)
@pytest.mark.parametrize("n", [16, 64, 256, 1024])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_power_of_two_widths_match_the_reference(n, bits, dtype):
    x = data(5, n, seed=n, dtype=dtype)
    signs = hadamard.random_signs(n, seed=1)
    codes, scales = hadamard_act_quant(x, bits, signs, clip_ratio=0.9)
    assert_near(codes, scales, *hadamard_act_quant_ref(x, bits, signs, 0.9), bits, n)


# m = 12, 20, 36 with one Sylvester factor; 12 x 256 and 28 x 256 with two (rows: 19 is not a
# multiple of the rows per program); Williamson's 172 x 4 (outside the tile: the composition)
@pytest.mark.parametrize(("n", "bits", "t"),
                         [(192, 8, 6), (192, 4, 6), (320, 8, 19), (576, 4, 6), (3072, 8, 3),
                          (7168, 4, 2), (688, 8, 3)])  # fmt: skip
def test_widths_with_a_small_factor_differ_by_at_most_one_level_rarely(n, bits, t):
    x = data(t, n, seed=n)
    signs = hadamard.random_signs(n, seed=2)
    codes, scales = hadamard_act_quant(x, bits, signs)
    assert_near(codes, scales, *hadamard_act_quant_ref(x, bits, signs), bits, n)


def test_large_and_zero_rows_keep_their_scale():
    """The power-of-two row scaling of the kernel: rows of ~1e30, ~1e-30 and zeros."""
    n = 256
    x = data(4, n, seed=5)
    x[0] *= 1e30
    x[1] *= 1e-30
    x[2] = 0
    signs = hadamard.random_signs(n, seed=3)
    codes, scales = hadamard_act_quant(x, 8, signs)
    assert_near(codes, scales, *hadamard_act_quant_ref(x, 8, signs), 8, n)


def test_the_rotation_spreads_an_outlier_channel():
    """Per-token int4 of x: the outlier channel leaves almost every other channel at code 0;
    after the rotation few codes are 0 (the quantization-kernel proportion of METHOD.md)."""
    from cbq_kernels.act_quant import act_quant_ref

    x = data(8, 256, seed=3)
    q_raw = unpack(act_quant_ref(x, 4)[0], 4, 256).long() - 8
    codes, _ = hadamard_act_quant(x, 4, hadamard.random_signs(256, seed=4))
    q_rot = unpack(codes, 4, 256).long() - 8
    assert float((q_raw == 0).float().mean()) > 0.9
    assert float((q_rot == 0).float().mean()) < 0.2


def test_bad_inputs_are_refused():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"signs must be a tensor of shape \(64,\)"):
        hadamard_act_quant(x, 8, torch.ones(32))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        hadamard_act_quant(x, 3, torch.ones(64))
    with pytest.raises(ValueError, match="size 188"):
        hadamard_act_quant(torch.randn(2, 188), 8, torch.ones(188))


def test_registered_op_passes_opcheck():
    from cbq_kernels.hadamard_quant import _op

    x = data(3, 64, seed=9)
    torch.library.opcheck(_op, (x, 8, hadamard.random_signs(64, 0), 1.0))
    torch.library.opcheck(_op, (x, 4, hadamard.random_signs(64, 0), 0.5))


def test_sixteen_warps_with_a_small_factor_are_neither_swept_nor_launched():
    """16 warps with a small factor gave wrong codes on the H200 (hadamard_quant's
    _MAX_WARPS_SMALL_FACTOR): the swept list leaves them out, a direct launch is refused, and
    power-of-two widths keep them."""
    from cbq_kernels.hadamard_quant import _launch, launch_configs

    assert launch_configs(28672) == [(1, 8)]
    assert (4, 16) in launch_configs(4096) and (8, 16) in launch_configs(4096)
    assert all(w <= 8 for _, w in launch_configs(1536))
    x = torch.zeros(1, 28672)
    with pytest.raises(ValueError, match=r"16 warps with a small Hadamard factor \(width 28672"):
        _launch(x, 8, torch.ones(28672), 1.0, 1, 16)


def test_the_cuda_kernel_takes_the_wide_widths_with_a_small_factor():
    """Which widths csrc/hadamard_quant.cu runs (where the extension has it): n >= 8192 with a
    small factor; the (m, mp, p) it is launched with; the padded small factor it reads."""
    from cbq_kernels.hadamard_quant import _cuda_shape, _small_padded, _use_cuda

    assert _cuda_shape(28672) == (28, 32, 1024)
    assert _cuda_shape(11008) == (172, 176, 64)
    assert _cuda_shape(4096) is None and _cuda_shape(1536) is None  # Triton's
    assert _cuda_shape(65536) is None  # a power of two, and beyond one block's row
    small = _small_padded(28, 32, torch.device("cpu"))
    assert small.shape == (28, 32) and not small[:, 28:].any()
    assert torch.equal(small[:, :28], torch.from_numpy(hadamard._small(28)).float())
    assert not _use_cuda(torch.zeros(2, 28672))  # a CPU tensor


def test_the_register_kernels_take_16_bit_rows_of_their_shapes():
    """The register kernels' launch query (host code: answers without a GPU): variant 1 (the
    tensor-core factor grown) takes 16-bit inputs with p >= 32 and m' = m p / min(p, 128) <=
    256, variant 3 (two m-tiles per warp) the same with p <= 64, variant 2 (the power-of-two
    factor across warps) p = 1024 with m <= 32 or 2048 with m <= 16, variant 0 the second
    where it applies, else the third where there are two m-tiles or more (640 = 20 x 32 has
    two: m' = 20; 11008: 11), else the first; the shared memory of Llama's widths within the
    H100/H200's 227 KB; -1 (not taken) otherwise, and an unknown variant is an error."""
    from cbq_kernels.hadamard_quant import _cuda_built, reg_smem_bytes

    if not _cuda_built():
        pytest.skip("cbq_kernels._C built without its CUDA kernels")
    for n in (28672, 11008, 12288, 20480, 640, 1536, 4096, 2304):
        for bits in (4, 8):
            for dtype in (torch.bfloat16, torch.float16):
                one = reg_smem_bytes(n, bits, dtype, 1)
                assert 0 < one <= 227 * 1024, (n, bits, dtype)
                two = reg_smem_bytes(n, bits, dtype, 2)
                assert (two > 0) == (n in (28672, 12288, 20480)) and two <= 227 * 1024, n
                three = reg_smem_bytes(n, bits, dtype, 3)  # two m-tiles per warp, p <= 64
                assert (three > 0) == (n in (11008, 640, 2304)) and three <= 227 * 1024, n
                auto = two if two > 0 else three if three > 0 else one
                assert reg_smem_bytes(n, bits, dtype) == auto, n
    assert reg_smem_bytes(28672, 8, torch.float32) == -1  # the tensor cores take 16-bit x
    assert reg_smem_bytes(192, 8, torch.bfloat16) == -1  # 12 x 16: p < 32
    assert reg_smem_bytes(172 * 256, 8, torch.bfloat16, 1) == -1  # m' = 172 x 2 > 256
    assert reg_smem_bytes(11008, 8, torch.bfloat16, 2) == -1  # p = 64
    with pytest.raises(ValueError, match=r"variant must be one of \(0, 1, 2, 3\), got 4"):
        reg_smem_bytes(11008, 8, torch.bfloat16, 4)
