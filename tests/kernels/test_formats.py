import pytest

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
