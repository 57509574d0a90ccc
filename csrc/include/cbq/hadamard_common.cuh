// Shared by the Hadamard + quantization kernels (csrc/hadamard_quant.cu; the register kernels
// csrc/hadamard_quant_reg.cu: the small factor grown on the tensor cores, and
// csrc/hadamard_quant_xch.cu: the power-of-two factor across warps): their common launch
// arguments, the sign-bit fragments, the quantizer's step and rounding; the PTX wrappers are
// cbq/ptx.cuh's. Contract: cbq_kernels/hadamard_quant.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/ptx.cuh"

namespace cbq {
namespace hreg {

using namespace ptx;

constexpr float kMagic = 12582912.0f;  // 1.5 2^23: x + kMagic rounds x to an integer (RNE)

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cbq_kernels._C: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

constexpr int kMaxDevices = 64;

// Raise `kernel`'s dynamic shared memory limit to `smem` once per device and larger size:
// `allowed` (kMaxDevices slots) is the kernel's own, a function-local static of its launcher
// (a host call per launch otherwise: the online rotation runs once per layer and token step)
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t smem, int device, std::atomic<int>* allowed) {
  std::atomic<int>* slot = device >= 0 && device < kMaxDevices ? &allowed[device] : nullptr;
  if (slot == nullptr || slot->load() < static_cast<int>(smem)) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "cudaFuncSetAttribute");
    if (slot != nullptr) slot->store(static_cast<int>(smem));
  }
}

// What every Hadamard kernel is given (the binding checked it): x (rows, n) 16-bit or fp32,
// the signs (n,), the small factor H_m as (m, mp) fp32 (columns >= m zero), the codes and
// scales, n = m p, and the quantizer's clip ratio, largest code and 1 / sqrt(n)
struct HqCommon {
  const void* x;
  const float* signs;
  const float* small;
  int32_t* codes;
  float* scales;
  int64_t rows;
  int n, m, mp, p;
  float ratio, qmax, inv_sqrt_n;
};

inline HqCommon hq_common(const void* x, const float* signs, const float* small, int32_t* codes,
                          float* scales, int64_t rows, int64_t n, int64_t m, int64_t mp,
                          int64_t p, int bits, float ratio, float inv_sqrt_n) {
  return HqCommon{x, signs, small, codes, scales, rows, static_cast<int>(n),
                  static_cast<int>(m), static_cast<int>(mp), static_cast<int>(p), ratio,
                  static_cast<float>((1 << (bits - 1)) - 1), inv_sqrt_n};
}

// Sign bits of fragment registers, four 4-register fragments per 32-bit word: fragment q's
// register r keeps its low element's bit at 15 - r - 4q and its high element's at 31 - r - 4q,
// so (word << (r + 4q)) & 0x80008000 is the register's two sign bits in place.
__host__ __device__ __forceinline__ uint32_t sign_bits_at(int q, int r, int high) {
  return 1u << ((high ? 31 : 15) - r - 4 * q);
}
__device__ __forceinline__ uint32_t sign_pair(uint32_t word, int q, int r) {
  return (word << (r + 4 * q)) & 0x80008000u;
}

// The next element of a thread's walk over a (rows x width) index space in steps of `step`
// (the block's threads): the row and column carried along instead of a division and a
// remainder by the runtime width per element (~20 integer instructions each in the SASS of
// the first register kernel, ~5 per element of a 28672 row over its copy, sign and store
// loops). Start at (tid / width, tid % width), once per kernel.
__device__ __forceinline__ void flat_next(int& r, int& c, int step, int width) {
  c += step;
  while (c >= width) {
    c -= width;
    ++r;
  }
}

// The step of cbq_kernels.quant_math.act_step for the row maximum amax of y (unscaled sums:
// y = sums / sqrt(n)), in the reference's operation order
__device__ __forceinline__ float act_step(float amax, float inv_sqrt_n, float ratio, float qmax) {
  const float r = __fmul_rn(amax, inv_sqrt_n);
  return fmaxf(__fdiv_rn(__fmul_rn(ratio, r), qmax), fmaxf(__fmul_rn(r, 9.5367431640625e-07f),
                                                            1e-8f));
}

// A code of sum v: clamp(round(v / sqrt(n) / s)) in the low bits of the returned word (int8:
// the low byte, two's complement; int4: the low nibble, offset 8)
template <int BITS>
__device__ __forceinline__ uint32_t code_bits(float v, float inv_sqrt_n, float inv_s, float qmax) {
  float u = __fmul_rn(__fmul_rn(v, inv_sqrt_n), inv_s);
  u = fminf(fmaxf(u, -qmax - 1.0f), qmax);
  return __float_as_uint(__fadd_rn(u, BITS == 8 ? kMagic : kMagic + 8.0f));
}

}  // namespace hreg

// The exchange kernel (hadamard_quant_xch.cu): the shared memory of a launch at n = m p (-1:
// not taken: p = 1024 or 2048 with m 16 (p / 128) <= 256, 16-bit inputs), and the launch.
int64_t hadamard_quant_xch_smem_bytes(int64_t n, int64_t m, int64_t p, int bits, int in_dtype);
void hadamard_quant_xch_launch(const void* x, const float* signs, const float* small,
                               int32_t* codes, float* scales, int64_t rows, int64_t n, int64_t m,
                               int64_t mp, int64_t p, int bits, int in_dtype, float ratio,
                               float inv_sqrt_n, int device, int sms, cudaStream_t stream);

}  // namespace cbq
