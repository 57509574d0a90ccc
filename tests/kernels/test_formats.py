import pytest
import torch

from cbq_kernels import formats
from cbq_kernels.packing import _lib


def test_python_mirror_matches_format_h():
    lib = _lib()
    assert lib.format_version() == formats.FORMAT_VERSION
    for bits in formats.SUPPORTED_BITS:
        assert lib.codes_per_word(bits) == formats.codes_per_word(bits)


@pytest.mark.parametrize(
    ("bits", "per_word", "container"), [(2, 16, 2), (3, 8, 4), (4, 8, 4), (8, 4, 8)]
)
def test_layout_constants(bits, per_word, container):
    assert formats.codes_per_word(bits) == per_word
    assert formats.container_bits(bits) == container
    assert formats.packed_words(0, bits) == 0
    assert formats.packed_words(per_word, bits) == 1
    assert formats.packed_words(per_word + 1, bits) == 2
    assert formats.default_zero_point(bits) == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16, 0, -4])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        formats.check_bits(bits)


@pytest.mark.parametrize("bits", [4.0, "4", True, None])
def test_bits_must_be_int(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        formats.check_bits(bits)


def test_metadata_records_everything_needed_to_read_back():
    meta = formats.format_metadata(3, 100, 64)
    assert meta["format_version"] == formats.FORMAT_VERSION
    assert (meta["bits"], meta["container_bits"], meta["k"], meta["group_size"]) == (3, 4, 100, 64)


def test_extension_binding_rejects_bad_arguments_itself():
    lib = _lib()
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        lib.pack_cpu(0, 0, 0, 0, 5)
    with pytest.raises(ValueError, match="null pointer"):
        lib.pack_cpu(0, 0, 2, 8, 4)
    with pytest.raises(ValueError, match="non-negative"):
        lib.unpack_cpu(0, 0, -1, 8, 4)
    with pytest.raises(ValueError, match="group_size must be positive"):
        lib.dequantize_cpu(0, 0, 0, 0, 0, 0, 4, 0, 0)
    with pytest.raises(ValueError, match="unknown output dtype"):
        lib.dequantize_cpu(0, 0, 0, 0, 0, 0, 4, 1, 7)


def test_scale_words_round_the_scale_and_carry_the_zero_point():
    """The scale word (the decode layout stores it; a hardened layer keeps it): the zero point
    in the low byte, the float value within 4.6e-5 of the scale (relative), unchanged by a
    second rounding; every magnitude from subnormal to 1e38, both signs; non-finite scales
    refused."""
    g = torch.Generator().manual_seed(11)
    mag = torch.exp2(torch.empty(4096).uniform_(-140, 126, generator=g))
    scales = torch.cat([mag, -mag, torch.tensor([0.0, 1.0, 2.0 - 2**-23, 3e38])])
    zeros = torch.randint(0, 16, scales.shape, generator=g)
    words = formats.scale_words(scales, zeros)
    assert torch.equal(words.view(torch.int32) & 0xFF, zeros.to(torch.int32))
    normal = scales.abs() >= 2**-126
    rel = ((words.double() - scales.double()).abs() / scales.double().abs())[normal]
    assert float(rel.max()) <= 383 * 2**-23 and float(rel.max()) > 2**-17  # the bound is tight
    tiny = ~normal  # subnormal and 0: within 383 units of 2^-149
    assert float((words.double() - scales.double()).abs()[tiny].max()) <= 383 * 2**-149
    assert torch.equal(formats.scale_words(words, zeros), words)  # idempotent
    assert torch.equal(torch.sign(words[normal]), torch.sign(scales[normal]))
    for bad in (float("nan"), float("inf"), 3.4028e38):
        with pytest.raises(ValueError, match="scales must be finite"):
            formats.scale_words(torch.tensor([1.0, bad]), torch.tensor([0, 15]))
