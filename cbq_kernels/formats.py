"""The packed storage format of cbq, in Python. Mirrors ``csrc/include/cbq/format.h``.

Codes are unsigned integers ``0 .. 2**b - 1`` (a signed value ``v`` is stored as
``v + 2**(b-1)``) of shape (N, K), K being the reduction dimension (``in_features``).

Packed layout, ``FORMAT_VERSION = 1`` (the layout of the compressed-tensors
"pack-quantized" format, which vLLM, SGLang and transformers load):

* each row is packed on its own into ``ceil(K / C)`` little-endian 32-bit words, stored as
  ``torch.int32``, with ``C = 32 // container_bits`` codes per word;
* code ``k`` of a row lives in word ``k // C`` at bits ``[j*b, j*b + b)``, ``j = k % C``,
  ``b = container_bits``;
* when K is not a multiple of C the last word of each row is padded with zero codes; the
  true K is kept by the caller and passed to ``unpack`` / ``dequantize``;
* 3-bit codes are stored in 4-bit containers.

Dequantization is ``w = (q - z) * s`` computed in float32 and rounded once (to nearest even)
to the output dtype, with one scale ``s`` and zero point ``z`` per row and group of
``group_size`` consecutive codes along K (the last group of a row may be shorter; per-channel
is one group of K). Without zero points ``z = 2**(b-1)``, the offset of signed codes.
"""

from __future__ import annotations

FORMAT_VERSION = 1
WORD_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: object) -> int:
    """Return ``bits`` if it is a supported bit width, else raise a TypeError / ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def container_bits(bits: int) -> int:
    """Width of the slot a code of ``bits`` bits occupies in a packed word (3 -> 4)."""
    return 4 if check_bits(bits) == 3 else bits


def codes_per_word(bits: int) -> int:
    """Codes stored in one 32-bit word."""
    return WORD_BITS // container_bits(bits)


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words of a packed row of ``k`` codes (the last one padded)."""
    per_word = codes_per_word(bits)
    return (k + per_word - 1) // per_word


def num_groups(k: int, group_size: int) -> int:
    """Number of scale groups along a row of ``k`` codes (the last one may be shorter)."""
    return (k + group_size - 1) // group_size


def groups_per_row(k: int, group_size: int | None) -> int:
    """Scale groups per row: 1 per channel (``group_size=None``), else :func:`num_groups`."""
    return 1 if group_size is None else num_groups(k, group_size)


def default_zero_point(bits: int) -> int:
    """Zero point used when none is given: the offset of signed (symmetric) codes."""
    return 1 << (check_bits(bits) - 1)


def format_metadata(bits: int, k: int, group_size: int | None) -> dict[str, int | str | None]:
    """What a file must record beside packed weights to be read back unambiguously."""
    return {
        "format": "cbq.packed",
        "format_version": FORMAT_VERSION,
        "bits": check_bits(bits),
        "container_bits": container_bits(bits),
        "k": k,
        "group_size": group_size,
        "word": "int32-le",
    }
