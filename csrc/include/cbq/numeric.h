// Host-side float -> fp16 / bf16 conversion, round to nearest even, bit-identical to
// PyTorch's CPU conversions (c10's fp16_ieee_from_fp32_value and round_to_nearest_even),
// so that the C++ CPU ops equal the PyTorch references byte for byte. The CUDA side uses the
// hardware conversions (__float2half_rn, __float2bfloat16_rn), which agree on finite values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cbq {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = float_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (mag < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5f leaves the float's ulp at 2^-24, the
    // fp16 subnormal step, so the hardware's own round-to-nearest-even does the rounding.
    const float r = bits_float(mag) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(r) - 0x3F000000u));
  }
  const uint32_t odd = (mag >> 13) & 1u;
  mag += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
  return static_cast<uint16_t>(sign | (mag >> 13));
}

}  // namespace cbq
