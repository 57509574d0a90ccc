// Shared by the register Hadamard + quantization kernels (csrc/hadamard_quant_reg.cu: the
// small factor grown on the tensor cores; csrc/hadamard_quant_xch.cu: the power-of-two factor
// across warps through shared memory): the PTX wrappers, the sign-bit fragments, the
// quantizer's step and rounding. Contract: cbq_kernels/hadamard_quant.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace cbq {
namespace hreg {

constexpr float kMagic = 12582912.0f;  // 1.5 2^23: x + kMagic rounds x to an integer (RNE)

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cbq_kernels._C: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const auto d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* row_addr) {
  const auto a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
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
