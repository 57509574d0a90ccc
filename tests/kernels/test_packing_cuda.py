"""GPU tests of cbq_kernels.packing: CUDA == C++ CPU == reference, at odd and real shapes."""

import pytest
import torch

from cbq_kernels import formats
from cbq_kernels.packing import dequantize, dequantize_ref, pack, pack_ref, unpack
from cbq_kernels.testing import LLAMA_LINEAR_SHAPES, PACK_BENCH_SHAPE, PACK_SHAPES_CPU, all_codes

pytestmark = pytest.mark.cuda

BITS = formats.SUPPORTED_BITS
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REAL_SHAPES = sorted({s for model in LLAMA_LINEAR_SHAPES.values() for s in model.values()})


def random_codes(n, k, bits, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g, device=device, dtype=torch.uint8)


def same_bytes(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def misaligned(t):
    """A contiguous copy of t whose data starts 1 element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def check_all_ops(codes, bits, group_size, out_dtype, zeros_kind="int"):
    """Runs pack / unpack / dequantize on codes (cuda) and compares with the CPU kernels."""
    n, k = codes.shape
    packed = pack(codes, bits)
    packed_cpu = pack(codes.cpu(), bits)
    assert torch.equal(packed.cpu(), packed_cpu)
    assert torch.equal(unpack(packed, bits, k), codes)
    groups = 1 if group_size is None else formats.num_groups(k, group_size)
    g = torch.Generator(device=codes.device).manual_seed(1)
    scales = torch.rand((n, groups), generator=g, device=codes.device) * 0.05 + 1e-3
    zeros = {
        "none": None,
        "int": torch.randint(0, 1 << bits, (n, groups), device=codes.device, dtype=torch.int32),
        "float": torch.rand((n, groups), generator=g, device=codes.device) * (1 << bits),
    }[zeros_kind]
    got = dequantize(packed, bits, k, scales, zeros, group_size, out_dtype)
    want = dequantize(
        packed_cpu, bits, k, scales.cpu(), None if zeros is None else zeros.cpu(), group_size,
        out_dtype,
    )  # fmt: skip
    assert same_bytes(got.cpu(), want)
    return packed, got


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", PACK_SHAPES_CPU)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_cuda_equals_cpu_odd_shapes(bits, shape, out_dtype):
    codes = random_codes(*shape, bits, "cuda")
    for group_size in (None, 1, 3, 16, 32, 128):
        for zeros_kind in ("none", "int", "float"):
            check_all_ops(codes, bits, group_size, out_dtype, zeros_kind)


@pytest.mark.parametrize("bits", BITS)
def test_cuda_every_code_value(bits):
    codes = all_codes(1 << bits, 4 * formats.codes_per_word(bits), bits, "cuda")
    check_all_ops(codes, bits, 8, torch.bfloat16)
    check_all_ops(codes[:, 1:].contiguous(), bits, 8, torch.bfloat16)  # ragged rows


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_cuda_real_shapes(bits, shape):
    codes = random_codes(*shape, bits, "cuda", seed=shape[0])
    for group_size, out_dtype in (
        (None, torch.float16),
        (128, torch.bfloat16),
        (64, torch.float32),
    ):
        check_all_ops(codes, bits, group_size, out_dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_bench_shape_matches_reference(bits):
    codes = random_codes(*PACK_BENCH_SHAPE, bits, "cuda", seed=7)
    packed, _ = check_all_ops(codes, bits, 128, torch.bfloat16)
    assert torch.equal(packed, pack_ref(codes, bits))  # the reference, on the GPU


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_misaligned_and_ragged_paths(bits):
    # Unaligned pointers and K % C != 0 take the row kernels; both must agree with the CPU.
    for n, k in ((33, 256), (17, 250), (5, 1)):
        codes = random_codes(n, k, bits, "cuda", seed=k)
        packed = pack(misaligned(codes), bits)
        assert torch.equal(packed.cpu(), pack(codes.cpu(), bits))
        assert torch.equal(unpack(misaligned(packed), bits, k), codes)
        scales = torch.rand((n, 1), device="cuda")
        got = dequantize(misaligned(packed), bits, k, scales, None, None, torch.bfloat16)
        want = dequantize_ref(packed.cpu(), bits, k, scales.cpu(), None, None, torch.bfloat16)
        assert same_bytes(got.cpu(), want)


def test_cuda_out_of_range_codes():
    codes = random_codes(64, 4096, 4, "cuda")
    codes[17, 1000] = 16
    with pytest.raises(ValueError, match=r"1 values outside \[0, 15\] for 4-bit.*max 16"):
        pack(codes, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 7\] for 3-bit"):
        pack(torch.full((4, 24), 9, dtype=torch.uint8, device="cuda")[:, 1:].contiguous(), 3)


def test_cuda_device_mismatch():
    packed = pack(random_codes(4, 32, 4, "cuda"), 4)
    with pytest.raises(ValueError, match="scales is on cpu but packed is on cuda:0"):
        dequantize(packed, 4, 32, torch.ones((4, 1)))


def test_cuda_side_stream():
    codes = random_codes(512, 4096, 4, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        packed = pack(codes, 4)
        back = unpack(packed, 4, 4096)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(back, codes)


def test_cuda_opcheck():
    codes = random_codes(37, 300, 4, "cuda")
    packed = pack(codes, 4)
    scales = torch.rand((37, 3), device="cuda")
    torch.library.opcheck(torch.ops.cbq.pack.default, (codes, 4))
    torch.library.opcheck(torch.ops.cbq.unpack.default, (packed, 4, 300))
    torch.library.opcheck(
        torch.ops.cbq.dequantize.default, (packed, 4, 300, scales, None, 128, torch.bfloat16)
    )


def test_cuda_torch_compile_fullgraph():
    def fn(codes, scales):
        packed = pack(codes, 4)
        return dequantize(packed, 4, codes.shape[1], scales, None, 128, torch.bfloat16) * 2

    codes = random_codes(256, 1024, 4, "cuda")
    scales = torch.rand((256, 8), device="cuda")
    got = torch.compile(fn, fullgraph=True)(codes, scales)
    assert same_bytes(got, fn(codes, scales))
