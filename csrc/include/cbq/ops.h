// The entry points implemented by pack_cpu.cpp and pack.cu, called by bindings.cpp after
// its checks. Pointers are raw device or host addresses; all tensors are contiguous.
//   codes:  uint8  (n, k)            unsigned codes
//   packed: int32  (n, packed_words(k, bits))
//   scales: fp32   (n, num_groups(k, group_size))
//   zeros:  fp32   same shape as scales, or null (z = default_zero_point(bits))
//   out:    fp32 / fp16 / bf16 (n, k)
#pragma once

#include <cstdint>

#include "cbq/format.h"

namespace cbq {

// Returns the number of codes that were >= 2^bits (they are stored masked to b bits).
int64_t pack_cpu(const uint8_t* codes, int32_t* packed, int64_t n, int64_t k, int bits);
void unpack_cpu(const int32_t* packed, uint8_t* codes, int64_t n, int64_t k, int bits);
void dequantize_cpu(const int32_t* packed, const float* scales, const float* zeros, void* out,
                    int64_t n, int64_t k, int bits, int64_t group_size, DType out_dtype);

#ifdef CBQ_WITH_CUDA
// Asynchronous on `stream` (a cudaStream_t) of device `device`. pack_cuda ORs 1 into the
// device int32 *error_flag when a code is >= 2^bits.
void pack_cuda(const uint8_t* codes, int32_t* packed, int32_t* error_flag, int64_t n, int64_t k,
               int bits, int device, std::uintptr_t stream);
void unpack_cuda(const int32_t* packed, uint8_t* codes, int64_t n, int64_t k, int bits,
                 int device, std::uintptr_t stream);
void dequantize_cuda(const int32_t* packed, const float* scales, const float* zeros, void* out,
                     int64_t n, int64_t k, int bits, int64_t group_size, DType out_dtype,
                     int device, std::uintptr_t stream);

// The decode GEMM (gemm_decode.cu; layout in its header and cbq_kernels/gemm_decode.py).
// a_mode: 0 bf16, 1 fp16, 2 int8 codes, 3 packed int4 codes (offset 8). out: (m, n) of
// out_dtype (DType), int32 when debug. 1 <= m <= decode_max_m() (M > 16: two 16-row m-tiles
// per block). ws: (splits, decode_ws_rows(m), n_pad) 32-bit scratch when splits > 1;
// counters: (n_pad / decode_tile_n(bits),) int32, zero, left zero.
int decode_tile_n(int bits);
int decode_chunk_k(int bits);
int decode_max_m();
int decode_ws_rows(int m);
void gemm_decode_cuda(const void* x, const float* x_scales, int a_mode, const int32_t* words,
                      const float* scales, const int32_t* zeros, const float* bias, void* out,
                      void* ws, int32_t* counters, int64_t m, int64_t n, int64_t k,
                      int64_t n_pad, int64_t ldx, int bits, int64_t group_size, int splits,
                      int out_dtype, bool debug, bool pdl, int device, std::uintptr_t stream);

// The online Hadamard rotation fused with per-token quantization (hadamard_quant.cu; contract
// in cbq_kernels/hadamard_quant.py). x: (rows, n) of in_dtype (DType), n = m p, p a power of
// two >= 32, 16-byte aligned; signs (n,) fp32 +-1; small (m, mp) fp32 +-1 (columns >= m zero,
// mp a multiple of 16); codes (rows, n) int8 or (rows, n / 8) int32 (bits 4); scales (rows,)
// fp32. mma: the small factor on the tensor cores (16-bit inputs), else on the CUDA cores.
// hadamard_quant_smem_bytes: the dynamic shared memory a launch needs, -1 where the kernel
// does not take the shape (the one answer to "does it run this", for the Python side too).
int64_t hadamard_quant_smem_bytes(int64_t n, int64_t m, int64_t mp, int64_t p, int in_dtype,
                                  bool mma);
void hadamard_quant_cuda(const void* x, const float* signs, const float* small, int32_t* codes,
                         float* scales, int64_t rows, int64_t n, int64_t m, int64_t mp,
                         int64_t p, int bits, int in_dtype, bool mma, float ratio,
                         float inv_sqrt_n, int device, std::uintptr_t stream);
// The register versions (hadamard_quant_reg.cu, hadamard_quant_xch.cu): the same contract and
// arguments, 16-bit inputs; variant 1: the tensor-core factor grown to m p / min(p, 128) <= 256
// (p >= 32), 3: the same with two m-tiles per warp (p <= 64), 2: the power-of-two factor
// across warps (p = 1024 with m <= 32, p = 2048 with m <= 16), 0: 2, else 3 (more than one
// m-tile), else 1, where they take the shape. The smem query answers -1 where the variant
// does not run.
int64_t hadamard_quant_reg_smem_bytes(int64_t n, int64_t m, int64_t p, int bits, int in_dtype,
                                      int variant);
void hadamard_quant_reg_cuda(const void* x, const float* signs, const float* small,
                             int32_t* codes, float* scales, int64_t rows, int64_t n, int64_t m,
                             int64_t mp, int64_t p, int bits, int in_dtype, int variant,
                             float ratio, float inv_sqrt_n, int device, std::uintptr_t stream);
#endif

}  // namespace cbq
