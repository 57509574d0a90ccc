"""CPU tests of cbq_kernels.packing: the C++ kernels against the PyTorch references."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbq_kernels import formats
from cbq_kernels.packing import (
    ExtensionNotBuiltError,
    _lib,
    dequantize,
    dequantize_ref,
    pack,
    pack_ref,
    unpack,
    unpack_ref,
)
from cbq_kernels.testing import PACK_SHAPES_CPU, all_codes

BITS = formats.SUPPORTED_BITS
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)


def same_bytes(a, b):
    """Exact equality, NaN payloads and signed zeros included."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


# ------------------------------------------------------------------ the layout, literally


def test_layout_4bit_literal_word():
    # Code j at bits 4j of a little-endian word: codes 1..8 read as 0x87654321.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    expected = 0x87654321 - (1 << 32)
    assert pack(codes, 4).tolist() == [[expected]]
    assert pack_ref(codes, 4).tolist() == [[expected]]


def test_layout_2bit_literal_word_and_padding():
    codes = torch.tensor([[0, 1, 2, 3] * 4 + [3, 2]], dtype=torch.uint8)
    # 0,1,2,3 -> 0b11_10_01_00 = 0xE4 per byte; the second word holds 3, 2 and zero padding.
    assert pack(codes, 2).tolist() == [[0xE4E4E4E4 - (1 << 32), 0b1011]]


def test_layout_8bit_is_little_endian_bytes():
    codes = torch.tensor([[0x11, 0x22, 0x33, 0x44, 0xFF]], dtype=torch.uint8)
    assert pack(codes, 8).tolist() == [[0x44332211, 0xFF]]


# ------------------------------------------------------------------ every code value


@pytest.mark.parametrize("bits", BITS)
def test_every_code_value_round_trips(bits):
    per_word = formats.codes_per_word(bits)
    codes = all_codes(1 << bits, 3 * per_word + 1, bits)  # every value at every slot, + padding
    packed = pack(codes, bits)
    assert torch.equal(packed, pack_ref(codes, bits))
    assert torch.equal(unpack(packed, bits, codes.shape[1]), codes)
    assert torch.equal(unpack_ref(packed, bits, codes.shape[1]), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", PACK_SHAPES_CPU)
def test_cpu_equals_reference(bits, shape):
    codes = random_codes(*shape, bits)
    packed = pack(codes, bits)
    assert torch.equal(packed, pack_ref(codes, bits))
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_ignores_padding_bits_like_reference(bits):
    # Arbitrary words, padding bits set: unpack must read only the first k codes.
    g = torch.Generator().manual_seed(1)
    k = 3 * formats.codes_per_word(bits) - 1
    packed = torch.randint(-(2**31), 2**31, (9, 3), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(unpack(packed, bits, k), unpack_ref(packed, bits, k))


def test_wider_integer_codes_are_accepted():
    codes = random_codes(7, 19, 4)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack(codes.to(dtype), 4), pack(codes, 4))


def test_empty_shapes():
    for n, k in ((0, 0), (0, 5), (4, 0)):
        codes = torch.zeros((n, k), dtype=torch.uint8)
        packed = pack(codes, 4)
        assert packed.shape == (n, formats.packed_words(k, 4))
        assert unpack(packed, 4, k).shape == (n, k)
        scales = torch.ones((n, 1))
        assert dequantize(packed, 4, k, scales).shape == (n, k)


# ------------------------------------------------------------------ dequantize


def make_scales(n, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, groups), generator=g) * 0.05 + 1e-3


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("group_size", [None, 1, 3, 8, 16, 32, 64])
@pytest.mark.parametrize("zeros_kind", ["none", "int", "float"])
def test_dequantize_equals_reference_bytes(bits, out_dtype, group_size, zeros_kind):
    n, k = 11, 100  # 100 is not a multiple of 8, 16, 32 or 64: ragged last words and groups
    codes = random_codes(n, k, bits, seed=bits)
    packed = pack(codes, bits)
    groups = 1 if group_size is None else formats.num_groups(k, group_size)
    scales = make_scales(n, groups).to(out_dtype)
    zeros = {
        "none": None,
        "int": torch.randint(0, 1 << bits, (n, groups), dtype=torch.int32),
        "float": torch.rand((n, groups)) * (1 << bits),
    }[zeros_kind]
    got = dequantize(packed, bits, k, scales, zeros, group_size, out_dtype)
    want = dequantize_ref(packed, bits, k, scales, zeros, group_size, out_dtype)
    assert same_bytes(got, want)


def test_dequantize_matches_the_formula():
    # Independent of the reference: w = (q - z) * s per group, written out by hand.
    codes = torch.tensor([[0, 1, 2, 3, 15, 14]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    zeros = torch.tensor([[1, 8]])
    got = dequantize(pack(codes, 4), 4, 6, scales, zeros, 3, torch.float32)
    assert got.tolist() == [[-0.5, 0.0, 0.5, -10.0, 14.0, 12.0]]
    sym = dequantize(pack(codes, 4), 4, 6, torch.ones((1, 1)), None, None, torch.float32)
    assert sym.tolist() == [[-8.0, -7.0, -6.0, -5.0, 7.0, 6.0]]


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounding_edge_cases(out_dtype):
    # Scales spanning fp16 subnormals, ties, and overflow to inf: the C++ conversion must
    # match PyTorch's bit for bit.
    k = 256
    codes = all_codes(16, k, 8)
    exps = torch.arange(-30, 18, dtype=torch.float32)
    scales = (2.0 ** exps[torch.arange(16 * 16) % len(exps)]).view(16, 16)
    scales = scales * (1 + torch.rand(16, 16, generator=torch.Generator().manual_seed(2)) * 2**-8)
    got = dequantize(pack(codes, 8), 8, k, scales, None, 16, out_dtype)
    want = dequantize_ref(pack(codes, 8), 8, k, scales, None, 16, out_dtype)
    assert same_bytes(got, want)
    if out_dtype == torch.float16:  # the cases above were reached: overflow and subnormals
        assert torch.isinf(got).any()
        assert (got.abs() < 6.1e-5).logical_and(got != 0).any()


# ------------------------------------------------------------------ properties


@st.composite
def packing_case(draw):
    bits = draw(st.sampled_from(BITS))
    n = draw(st.integers(0, 9))
    k = draw(st.integers(0, 70))
    seed = draw(st.integers(0, 2**16))
    return bits, random_codes(n, k, bits, seed)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(packing_case())
def test_property_round_trip_and_reference(case):
    bits, codes = case
    packed = pack(codes, bits)
    assert torch.equal(packed, pack_ref(codes, bits))
    assert torch.equal(unpack(packed, bits, codes.shape[1]), codes)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    packing_case(),
    st.one_of(st.none(), st.integers(1, 80)),
    st.sampled_from(OUT_DTYPES),
    st.booleans(),
)
def test_property_dequantize(case, group_size, out_dtype, with_zeros):
    bits, codes = case
    n, k = codes.shape
    groups = 1 if group_size is None else formats.num_groups(k, group_size)
    scales = make_scales(n, groups)
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8) if with_zeros else None
    packed = pack(codes, bits)
    got = dequantize(packed, bits, k, scales, zeros, group_size, out_dtype)
    assert same_bytes(got, dequantize_ref(packed, bits, k, scales, zeros, group_size, out_dtype))


# ------------------------------------------------------------------ errors


def test_codes_out_of_range():
    with pytest.raises(ValueError, match=r"outside \[0, 15\] for 4-bit.*max 16"):
        pack(torch.full((2, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"outside \[0, 7\] for 3-bit"):
        pack(torch.full((2, 9), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\] for 2-bit.*min -1"):
        pack(torch.full((1, 3), -1, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"outside \[0, 255\]"):
        pack(torch.full((1, 3), 256, dtype=torch.int32), 8)


@pytest.mark.parametrize(
    ("codes", "bits", "error", "match"),
    [
        (
            torch.zeros(2, 8),
            4,
            TypeError,
            r"codes must have dtype in .*got shape \(2, 8\), "
            r"dtype torch.float32",
        ),
        (torch.zeros(2, 8, dtype=torch.bool), 4, TypeError, "codes must have dtype"),
        (torch.zeros(8, dtype=torch.uint8), 4, ValueError, r"codes must be 2-D.*shape \(8,\)"),
        (torch.zeros(2, 2, 8, dtype=torch.uint8), 4, ValueError, "codes must be 2-D"),
        (torch.zeros(8, 2, dtype=torch.uint8).t(), 4, ValueError, "codes must be contiguous"),
        (torch.zeros(2, 8, dtype=torch.uint8), 5, ValueError, "bits must be one of"),
        (torch.zeros(2, 8, dtype=torch.uint8), 4.0, TypeError, "bits must be an int"),
        ([[1, 2]], 4, TypeError, "codes must be a torch.Tensor, got list"),
    ],
)
def test_pack_bad_input(codes, bits, error, match):
    with pytest.raises(error, match=match):
        pack(codes, bits)


def test_unpack_bad_input():
    packed = torch.zeros((3, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"2 words per row but K=17 .* need 3"):
        unpack(packed, 4, 17)
    with pytest.raises(TypeError, match="packed must have dtype"):
        unpack(packed.to(torch.int64), 4, 16)
    with pytest.raises(ValueError, match="k must be >= 0"):
        unpack(packed, 4, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        unpack(packed, 4, 16.0)
    with pytest.raises(ValueError, match="packed must be contiguous"):
        unpack(torch.zeros((2, 3), dtype=torch.int32).t(), 4, 16)


def test_dequantize_bad_input():
    packed = pack(random_codes(4, 20, 4), 4)
    s = torch.ones((4, 3))
    with pytest.raises(
        ValueError,
        match=r"scales must have shape \(N, groups\) = \(4, 3\).*"
        r"group_size=8; got shape \(4, 2\)",
    ):
        dequantize(packed, 4, 20, torch.ones((4, 2)), None, 8)
    with pytest.raises(
        ValueError,
        match=r"scales must have shape \(N, groups\) = \(4, 1\).*"
        r"per channel",
    ):
        dequantize(packed, 4, 20, s)
    with pytest.raises(ValueError, match="scales must be contiguous"):
        dequantize(packed, 4, 20, torch.ones((3, 4)).t(), None, 8)
    with pytest.raises(TypeError, match="scales must be float32, float16 or bfloat16, got"):
        dequantize(packed, 4, 20, s.to(torch.int32), None, 8)
    with pytest.raises(ValueError, match=r"zeros must have shape.*got shape \(4, 2\)"):
        dequantize(packed, 4, 20, s, torch.zeros((4, 2)), 8)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        dequantize(packed, 4, 20, s, None, 0)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        dequantize(packed, 4, 20, s, None, 8, torch.int8)
    with pytest.raises(ValueError, match="scales is on meta but packed is on cpu"):
        dequantize(packed, 4, 20, s.to("meta"), None, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        dequantize(packed, 6, 20, s, None, 8)


def test_direct_op_calls_are_checked_too():
    with pytest.raises(ValueError, match="codes must be contiguous"):
        torch.ops.cbq.pack(torch.zeros(8, 2, dtype=torch.uint8).t(), 4)
    with pytest.raises(ValueError, match="words per row"):
        torch.ops.cbq.unpack(torch.zeros((1, 1), dtype=torch.int32), 4, 9)


# ------------------------------------------------------------------ torch.library


def test_opcheck():
    codes = random_codes(5, 37, 4)
    packed = pack(codes, 4)
    scales, zeros = make_scales(5, 3), torch.randint(0, 16, (5, 3), dtype=torch.int32)
    torch.library.opcheck(torch.ops.cbq.pack.default, (codes, 4))
    torch.library.opcheck(torch.ops.cbq.unpack.default, (packed, 4, 37))
    for args in (
        (packed, 4, 37, scales, zeros, 16, torch.bfloat16),
        (packed, 4, 37, scales[:, :1].contiguous(), None, None, torch.float16),
    ):
        torch.library.opcheck(torch.ops.cbq.dequantize.default, args)


def test_torch_compile_fullgraph():
    def roundtrip(codes, scales):
        packed = pack(codes, 4)
        return unpack(packed, 4, codes.shape[1]), dequantize(
            packed, 4, codes.shape[1], scales, None, 32, torch.float32
        )

    codes, scales = random_codes(6, 64, 4), make_scales(6, 2)
    compiled = torch.compile(roundtrip, fullgraph=True)
    got_codes, got_w = compiled(codes, scales)
    want_codes, want_w = roundtrip(codes, scales)
    assert torch.equal(got_codes, want_codes) and torch.equal(got_w, want_w)


# ------------------------------------------------------------------ build


@pytest.mark.slow
def test_import_without_extension_and_clear_error_on_use():
    # A fresh interpreter in which cbq_kernels._C cannot be imported.
    code = (
        "import sys; sys.modules['cbq_kernels._C'] = None\n"
        "import torch, cbq_kernels\n"
        "try:\n"
        "    cbq_kernels.pack(torch.zeros((1, 8), dtype=torch.uint8), 4)\n"
        "except cbq_kernels.ExtensionNotBuiltError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR cbq_kernels._C is not built" in out.stdout
    assert ExtensionNotBuiltError is not None


@pytest.mark.skipif(
    os.environ.get("CBQ_REQUIRE_CUDA") != "1", reason="only where CBQ_REQUIRE_CUDA=1 (CI)"
)
def test_ci_build_contains_cuda_kernels():
    assert _lib().has_cuda(), "CBQ_REQUIRE_CUDA=1 but the extension was built without CUDA"
