// CPU implementations of pack / unpack / dequantize. Plain loops over rows and words: the
// packed layout is the spec (format.h), and these are written to mirror it line by line.
#include <cstring>

#include "cbq/format.h"
#include "cbq/numeric.h"
#include "cbq/ops.h"

namespace cbq {

namespace {

// Per word, with the container width a template constant. unpack looped over K with a
// division and a shift by a runtime amount per code: 0.60 Gcodes/s on the 2-core dev machine,
// 2.7 per word (scripts/bench_dequantize_cpu.py; benchmarks/results/cpu/dequantize_cpu.md);
// pack already went word by word (~2 Gcodes/s, unchanged).
template <int B>
int64_t pack_rows(const uint8_t* codes, int32_t* packed, int64_t n, int64_t k, int bits) {
  constexpr int kPer = kWordBits / B;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int64_t words = packed_words(k, bits);
  const uint32_t limit = 1u << bits;  // 3-bit codes must stay below 8 in their 4-bit container
  int64_t bad = 0;
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* src = codes + row * k;
    int32_t* dst = packed + row * words;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t k0 = w * kPer;
      const int count = (k - k0) < kPer ? static_cast<int>(k - k0) : kPer;
      uint32_t word = 0;
      for (int j = 0; j < count; ++j) {
        const uint32_t code = src[k0 + j];
        bad += code >= limit;
        word |= (code & kMask) << (j * B);
      }
      std::memcpy(&dst[w], &word, sizeof word);
    }
  }
  return bad;
}

template <int B>
void unpack_rows(const int32_t* packed, uint8_t* codes, int64_t n, int64_t k, int bits) {
  constexpr int kPer = kWordBits / B;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int64_t words = packed_words(k, bits);
  for (int64_t row = 0; row < n; ++row) {
    const int32_t* src = packed + row * words;
    uint8_t* dst = codes + row * k;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t k0 = w * kPer;
      const int count = (k - k0) < kPer ? static_cast<int>(k - k0) : kPer;
      uint32_t word;
      std::memcpy(&word, &src[w], sizeof word);
      for (int j = 0; j < count; ++j) dst[k0 + j] = static_cast<uint8_t>((word >> (j * B)) & kMask);
    }
  }
}

}  // namespace

int64_t pack_cpu(const uint8_t* codes, int32_t* packed, int64_t n, int64_t k, int bits) {
  switch (container_bits(bits)) {
    case 2: return pack_rows<2>(codes, packed, n, k, bits);
    case 4: return pack_rows<4>(codes, packed, n, k, bits);
    default: return pack_rows<8>(codes, packed, n, k, bits);
  }
}

void unpack_cpu(const int32_t* packed, uint8_t* codes, int64_t n, int64_t k, int bits) {
  switch (container_bits(bits)) {
    case 2: unpack_rows<2>(packed, codes, n, k, bits); break;
    case 4: unpack_rows<4>(packed, codes, n, k, bits); break;
    default: unpack_rows<8>(packed, codes, n, k, bits); break;
  }
}

namespace {

// One row's codes of one word at a time, the group's scale and zero point read once per group:
// the loop this replaces took a 64-bit division for the word, the code's shift and the group
// of every code (0.31 Gcodes/s on the 2-core dev machine, 80% of SmolLM2's CPU generation time
// in cProfile; scripts/bench_dequantize_cpu.py). Codes of a group that starts inside a word
// (a group size that is not a multiple of the codes per word) go one by one.
template <int B, typename Store>
void dequantize_rows_b(const int32_t* packed, const float* scales, const float* zeros, int64_t n,
                       int64_t k, int bits, int64_t group_size, Store store) {
  constexpr int kPer = kWordBits / B;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int64_t words = packed_words(k, bits);
  const int64_t groups = num_groups(k, group_size);
  const float z_default = default_zero_point(bits);
  for (int64_t row = 0; row < n; ++row) {
    const int32_t* src = packed + row * words;
    const int64_t base = row * k;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size;
      const int64_t k1 = k0 + group_size < k ? k0 + group_size : k;
      const float s = scales[row * groups + g];
      const float z = zeros ? zeros[row * groups + g] : z_default;
      if (k0 % kPer == 0) {
        for (int64_t kk = k0; kk < k1; kk += kPer) {
          uint32_t word;
          std::memcpy(&word, &src[kk / kPer], sizeof word);
          const int64_t count = k1 - kk < kPer ? k1 - kk : kPer;
          for (int j = 0; j < count; ++j) {
            const float q = static_cast<float>((word >> (j * B)) & kMask);
            // (q - z) * s, in this order, is the contract shared with the reference and CUDA.
            store(base + kk + j, (q - z) * s);
          }
        }
      } else {
        for (int64_t kk = k0; kk < k1; ++kk) {
          uint32_t word;
          std::memcpy(&word, &src[kk / kPer], sizeof word);
          const float q = static_cast<float>((word >> ((kk % kPer) * B)) & kMask);
          store(base + kk, (q - z) * s);
        }
      }
    }
  }
}

template <typename Store>
void dequantize_rows(const int32_t* packed, const float* scales, const float* zeros, int64_t n,
                     int64_t k, int bits, int64_t group_size, Store store) {
  switch (container_bits(bits)) {
    case 2:
      dequantize_rows_b<2>(packed, scales, zeros, n, k, bits, group_size, store);
      break;
    case 4:
      dequantize_rows_b<4>(packed, scales, zeros, n, k, bits, group_size, store);
      break;
    default:
      dequantize_rows_b<8>(packed, scales, zeros, n, k, bits, group_size, store);
      break;
  }
}

}  // namespace

void dequantize_cpu(const int32_t* packed, const float* scales, const float* zeros, void* out,
                    int64_t n, int64_t k, int bits, int64_t group_size, DType out_dtype) {
  switch (out_dtype) {
    case DType::kFloat32: {
      float* o = static_cast<float*>(out);
      dequantize_rows(packed, scales, zeros, n, k, bits, group_size,
                      [o](int64_t i, float v) { o[i] = v; });
      break;
    }
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_rows(packed, scales, zeros, n, k, bits, group_size,
                      [o](int64_t i, float v) { o[i] = float_to_fp16_bits(v); });
      break;
    }
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out);
      dequantize_rows(packed, scales, zeros, n, k, bits, group_size,
                      [o](int64_t i, float v) { o[i] = float_to_bf16_bits(v); });
      break;
    }
  }
}

}  // namespace cbq
