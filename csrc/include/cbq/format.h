// The packed storage format of cbq: the one written specification, mirrored in
// cbq_kernels/formats.py (a test checks that both agree).
//
// Codes are unsigned integers 0 .. 2^b - 1 (a signed value v is stored as v + 2^(b-1)),
// one row per output channel: shape (N, K), K the reduction dimension.
//
// Packed layout, version 1 (the layout of the compressed-tensors "pack-quantized" format):
//   - each row is packed independently into ceil(K / C) little-endian 32-bit words
//     (stored as int32), C = 32 / container_bits codes per word;
//   - code k of a row lives in word k / C at bits [j*b, j*b + b), j = k % C, b = container_bits;
//   - when K is not a multiple of C the last word is padded with zero codes; the true K is
//     kept by the caller (it is an argument of unpack and dequantize);
//   - 3-bit codes are stored in 4-bit containers (C = 8).
//
// Dequantization: w = (q - z) * s in fp32, rounded once to the output dtype (round to nearest
// even), with one scale s (and zero point z) per row and group of `group_size` consecutive
// codes along K (the last group of a row may be shorter). Without zero points z = 2^(b-1), the
// offset of signed codes (symmetric quantization).
#pragma once

#include <cstdint>

namespace cbq {

constexpr int kFormatVersion = 1;
constexpr int kWordBits = 32;

// Bit widths accepted by the ops; 3 is stored in a 4-bit container.
constexpr bool is_supported_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 8;
}

constexpr int container_bits(int bits) { return bits == 3 ? 4 : bits; }

constexpr int codes_per_word(int bits) { return kWordBits / container_bits(bits); }

constexpr int64_t packed_words(int64_t k, int bits) {
  return (k + codes_per_word(bits) - 1) / codes_per_word(bits);
}

constexpr int64_t num_groups(int64_t k, int64_t group_size) {
  return (k + group_size - 1) / group_size;
}

// The zero point used when no zero points are given (symmetric, signed codes offset).
constexpr float default_zero_point(int bits) { return static_cast<float>(1 << (bits - 1)); }

// Output dtypes of dequantize, as passed across the binding (not torch's numbering).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cbq
