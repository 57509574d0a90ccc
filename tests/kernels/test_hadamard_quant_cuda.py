"""GPU tests of the online Hadamard + per-token quantization (same contracts as on CPU) at
real widths: SmolLM2's down_proj input 1536 = 12 x 128, a power of two (the Triton kernel),
Llama-2-70B's 28672 = 28 x 1024 and Llama-2-7B's 11008 = 172 x 64 (the CUDA kernel of
csrc/hadamard_quant.cu where the extension has it; else the Triton tile at 28672 and the
composition, transform then act_quant, at 11008); bf16 and fp32 inputs. The Triton tile at
28672 keeps its own test (test_launch_configs)."""

import pytest
import torch

from cbq_kernels import hadamard
from cbq_kernels.act_quant import act_quant
from cbq_kernels.hadamard_quant import (
    _cuda_built,
    _fits,
    _launch_cuda,
    _reg_takes,
    _use_cuda,
    _use_cuda_reg,
    hadamard_act_quant,
    hadamard_act_quant_ref,
)
from cbq_kernels.packing import unpack

pytestmark = pytest.mark.cuda


def data(t, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, n, generator=g, device="cuda") * 2
    x[:, 5] *= 300.0  # a massive-activation channel
    return x.to(torch.bfloat16)


def levels(codes, bits, n):
    return codes.long() if bits == 8 else unpack(codes, 4, n).long()


def assert_contract(got, want, bits, n, where=()):
    """The fused quantizer's contract against the reference's (codes, scales): scales to
    1e-5, codes at most one level apart in at most one element per 1000."""
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    diff = (levels(got[0], bits, n) - levels(want[0], bits, n)).abs()
    assert int(diff.max()) <= 1, (*where, bits, int(diff.max()))
    assert int((diff > 0).sum()) <= diff.numel() // 1000, (*where, bits, int((diff > 0).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [4096, 1536, 28672, 11008])
def test_matches_the_reference(n, bits, dtype):
    x = data(2048, n, seed=n).to(dtype)
    signs = hadamard.random_signs(n, 3).cuda()
    got = hadamard_act_quant(x, bits, signs, clip_ratio=0.9)
    assert _fits(n) == (n != 11008)
    assert_contract(got, hadamard_act_quant_ref(x, bits, signs, 0.9), bits, n)


@pytest.mark.parametrize("n", [1536, 4096, 28672])
def test_launch_configs(n):
    """Every launch configuration benchmarks/bench_hadamard.py sweeps gives the reference's
    codes (2d9c58b and 3a9aa0a: at 28672 the int8 codes with 16 warps were up to 255 levels
    off while 8 warps passed; 16 warps with a small factor are refused now)."""
    from cbq_kernels.hadamard_quant import _launch, launch_configs

    x = data(64, n, seed=7)
    signs = hadamard.random_signs(n, 5).cuda()
    for bits in (8, 4):
        want = hadamard_act_quant_ref(x, bits, signs, 1.0)
        for rows, warps in launch_configs(n):
            assert_contract(_launch(x, bits, signs, 1.0, rows, warps), want, bits, n,
                            (rows, warps))  # fmt: skip


def need_cuda_kernel():
    if not _cuda_built():
        pytest.fail("cbq_kernels._C lacks hadamard_quant_cuda: build with scripts/gpu_check.sh")


# the small factor on the tensor cores (16-bit inputs) and on the CUDA cores (its register
# path: m = 12, 20, 28; its task path: m = 172); one row, fewer rows than SMs, more rows than
# SMs (each block loops over rows and copies the next one ahead)
@pytest.mark.parametrize("n", [28672, 11008, 12288, 20480])
@pytest.mark.parametrize(("dtype", "mma"), [(torch.bfloat16, True), (torch.float16, True),
                                            (torch.bfloat16, False), (torch.float16, False),
                                            (torch.float32, False)])  # fmt: skip
@pytest.mark.parametrize("t", [1, 3, 333])
def test_the_cuda_kernel_matches_the_reference(n, dtype, mma, t):
    need_cuda_kernel()
    x = data(t, n, seed=n + t).to(dtype)
    assert _use_cuda(x, mma) and not _use_cuda(x.float(), mma=True)
    signs = hadamard.random_signs(n, 11).cuda()
    for bits, ratio in ((8, 1.0), (4, 0.8)):
        assert_contract(_launch_cuda(x, bits, signs, ratio, mma),
                        hadamard_act_quant_ref(x, bits, signs, ratio), bits, n)  # fmt: skip


def test_the_cuda_kernel_is_deterministic_and_takes_zero_rows():
    need_cuda_kernel()
    n = 28672
    x = data(200, n, seed=3)
    x[7] = 0  # a zero row: the step's floor, all codes 0
    signs = hadamard.random_signs(n, 2).cuda()
    for mma in (True, False):
        a = _launch_cuda(x, 8, signs, 1.0, mma)
        b = _launch_cuda(x, 8, signs, 1.0, mma)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert int(a[0][7].abs().max()) == 0 and float(a[1][7]) == float(torch.tensor(1e-8))
        codes, scales = _launch_cuda(x[:0], 4, signs, 1.0, mma)
        assert codes.shape == (0, n // 8) and scales.shape == (0,)


def test_the_api_runs_the_cuda_kernel_unless_switched_off(monkeypatch):
    """16-bit inputs: the register kernel by default, the shared-memory kernel under
    CBQ_HADAMARD_CUDA=smem (and for fp32 inputs), the composition under 0."""
    need_cuda_kernel()
    n = 11008
    x = data(64, n, seed=5)
    signs = hadamard.random_signs(n, 4).cuda()
    codes, scales = hadamard_act_quant(x, 8, signs)
    want_codes, want_scales = _launch_cuda(x, 8, signs, 1.0, reg=True)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    codes, scales = hadamard_act_quant(x.float(), 8, signs)
    want_codes, want_scales = _launch_cuda(x.float(), 8, signs, 1.0)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    monkeypatch.setenv("CBQ_HADAMARD_CUDA", "smem")
    codes, scales = hadamard_act_quant(x, 8, signs)
    want_codes, want_scales = _launch_cuda(x, 8, signs, 1.0)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    monkeypatch.setenv("CBQ_HADAMARD_CUDA", "0")  # the composition: the transform, act_quant
    codes, scales = hadamard_act_quant(x, 8, signs)
    want_codes, want_scales = act_quant(hadamard.apply(x.float(), signs), 8)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


# The register kernels (the API's default for 16-bit inputs): variant 1
# (csrc/hadamard_quant_reg.cu) at the same widths and three below the API's (launched directly):
# its three accumulator widths (pw = 32 at 640 = 20 x 32, 64 at 11008, 128 at the others), one to
# sixteen rows per block (12288: m' = 96, two rows per block of 12 warps; 640: eight; 1536: m' =
# 12, sixteen), no small factor (4096: m' = 32 from H_32 (x) H_128); variant 2
# (csrc/hadamard_quant_xch.cu) at the widths it takes (28672: 16 warps, 12288: two rows per block
# of 8 warps, 20480); variant 3 (two m-tiles per warp, p <= 64: 11008 = 6 warps of which the last
# has one tile, 640 = one warp, 2304 = 36 x 64: two warps, the second with one tile); a last block
# with fewer rows than it holds (t = 3, 333), 16-bit inputs.
@pytest.mark.parametrize(("n", "variant"), [
    (28672, 1), (28672, 2), (11008, 1), (11008, 3), (12288, 1), (12288, 2), (20480, 1),
    (20480, 2), (640, 1), (640, 3), (2304, 3), (1536, 1), (4096, 1)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 3, 333])
def test_the_register_kernel_matches_the_reference(n, variant, dtype, t):
    need_cuda_kernel()
    x = data(t, n, seed=n + t + 1).to(dtype)
    signs = hadamard.random_signs(n, 13).cuda()
    for bits, ratio in ((8, 1.0), (4, 0.8)):
        # below 8192 (640 = 20 x 32, 1536 = 12 x 128, 4096 = 1 x 32 x 128) the API runs Triton
        assert _reg_takes(x, bits, variant) and _use_cuda_reg(x, bits) == (n >= 8192)
        got = _launch_cuda(x, bits, signs, ratio, reg=True, variant=variant)
        want = hadamard_act_quant_ref(x, bits, signs, ratio)
        assert_contract(got, want, bits, n, where_codes_differ(got[0], want[0], bits, n))


def where_codes_differ(got, want, bits, n):
    """Where the register kernel's codes differ from the reference's, in its own terms (empty
    when they agree within a level): rows, and (segment, column) of the first differences for
    segments of pw = min(p, 128) elements (an MMA tile is 16 segments; a lane holds columns
    8 nt + 2 t + e), so that a failing GPU run says which part of the kernel to look at."""
    diff = (levels(got, bits, n) - levels(want, bits, n)).abs() > 1
    if not bool(diff.any()):
        return ()
    _, p = hadamard.factor(n)
    pw = min(p, 128)
    rows = diff.any(1).nonzero()[:, 0]
    cols = diff[rows[0]].nonzero()[:, 0]
    segs = sorted({int(c) // pw for c in cols})
    return (f"rows {rows[:8].tolist()} of {diff.shape[0]}", f"segments {segs[:16]}",
            f"columns in segment {sorted({int(c) % pw for c in cols})[:16]}",
            f"{int(diff.sum())} codes off by more than one level")


def test_the_register_kernel_is_deterministic_and_takes_zero_rows(monkeypatch):
    need_cuda_kernel()
    n = 28672
    x = data(200, n, seed=4)
    x[9] = 0  # a zero row: the step's floor, all codes 0
    signs = hadamard.random_signs(n, 2).cuda()
    a = _launch_cuda(x, 8, signs, 1.0, reg=True)  # variant 0: the exchange kernel here
    b = _launch_cuda(x, 8, signs, 1.0, reg=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[0][9].abs().max()) == 0 and float(a[1][9]) == float(torch.tensor(1e-8))
    codes, scales = _launch_cuda(x[:0], 4, signs, 1.0, reg=True)
    assert codes.shape == (0, n // 8) and scales.shape == (0,)
    codes, scales = hadamard_act_quant(x, 8, signs)  # the API's default
    assert torch.equal(codes, a[0]) and torch.equal(scales, a[1])
    monkeypatch.setenv("CBQ_HADAMARD_CUDA", "reg")  # and its explicit name
    codes, scales = hadamard_act_quant(x, 8, signs)
    assert torch.equal(codes, a[0]) and torch.equal(scales, a[1])
    with pytest.raises(ValueError, match="not taken"):  # fp32: the register kernel refuses
        _launch_cuda(x.float(), 8, signs, 1.0, reg=True)
