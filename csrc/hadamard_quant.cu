// Online Hadamard rotation fused with per-token activation quantization for wide rows: one
// thread block per token row (persistent blocks, one per SM, looping over rows), the row in
// shared memory. The contract is cbq_kernels/hadamard_quant.py's (reference:
// hadamard_act_quant_ref):
//   y = (x * signs) (H_m (x) H_p) / sqrt(n),   n = m p, p = 2^j, H_m +-1 (Paley / Williamson),
//   r = max |y|,  s = max(ratio r / P, max(2^-20 r, 1e-8)),  q = clamp(round(y (1 / s)), -P-1, P)
// int8 codes, or int4 codes offset by 8 and packed 8 per little-endian int32 word.
//
// Why a CUDA kernel (issue 15): the Triton kernel holds a row in one program's registers; at
// 28672 = 28 x 1024 and at 11008 = 172 x 64 that tile spills (ptxas: 255 registers and 700-1552
// bytes per thread, docs/results/issue15/hadamard_ptxas.txt) and ran at 4.7% and 3.2% of the
// copy bandwidth (benchmarks/results/h200/bench_hadamard_3a9aa0a.md). Here the row is spread
// over a block's shared memory and registers, with the exchanges written out:
//  1. bf16 / fp16 rows are copied one row ahead by cp.async into a staging buffer (segment i at
//     row i of an (mp, p + 8) array: the pad keeps ldmatrix free of bank conflicts), so that
//     the next row's HBM read overlaps this row's arithmetic; fp32 rows are loaded directly;
//  2. the small factor along the segments, y[i'][j] = sum_i H[i][i'] x[i][j] (exact +-1
//     products, fp32 sums), into an fp32 row buffer (element e at e + e / 32 + e / 1024: the
//     strided passes below are free of bank conflicts), either
//     - on the tensor cores (MMA, 16-bit inputs): the signs flipped in the staging buffer,
//       then mma.m16n8k16 with H^T as A (fragments built once per block) and x as B (ldmatrix
//       .trans from the staging buffer); bf16 / fp16 x and +-1 are exact operands; or
//     - on the CUDA cores (fp32 inputs, and the comparison): the row with its signs in the fp32
//       buffer, then m <= 32: a thread owns two columns and all their m inputs in registers,
//       16 outputs per pass; larger m: a warp owns 32 columns and 16 outputs, the outputs
//       held until every input has been read;
//  3. the power-of-two factor: radix-32 passes (a thread loads 32 values at one stride,
//     butterflies in registers, stores them back), the last one also takes the row maximum;
//  4. the scale and the codes, eight consecutive elements (one int4 word) per thread.
// The factors are applied in another order than the reference (small factor first) and the
// fp32 sums in another order, so a code can differ by one level where y / s lies within ~1e-6
// of a rounding boundary and a scale in its last bits: the Triton kernel's contract, which
// the same GPU tests check. Cost of the small factor: m multiply-adds per element on the CUDA
// cores (28 at 28672, 172 at 11008), a sixteenth of an MMA's work per 16 on the tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/format.h"
#include "cbq/hadamard_common.cuh"
#include "cbq/ops.h"

namespace cbq {
namespace {

using namespace hreg;

constexpr int kHqThreads = 256;  // 512 spilled (128 registers); 256: 214-221, none
constexpr int kHqWarps = kHqThreads / 32;
constexpr int kOut = 16;        // outputs of the small factor per pass
constexpr int kSmallM = 32;     // m up to this: the register path of step 2
constexpr int kMaxTasks = 4;    // (32 columns, 16 outputs) tasks per warp in the large path

using HqArgs = hreg::HqCommon;

// element e of the fp32 row buffer: one padding float per 32 elements and one per 1024 (the
// MMA's stores go to rows of the segments, 1024 apart at 28672)
__host__ __device__ __forceinline__ int padded(int e) { return e + (e >> 5) + (e >> 10); }

// floats of the padded row buffer, a multiple of 4 so that what follows is 16-byte aligned
__host__ __device__ __forceinline__ int row_floats(int n) { return (padded(n - 1) + 1 + 3) / 4 * 4; }

// staging buffer: (mp, p + 8) 16-bit values
__host__ __device__ __forceinline__ int stage_pitch(int p) { return p + 8; }

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float* f) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      f[2 * j] = __uint_as_float(u[j] << 16);
      f[2 * j + 1] = __uint_as_float(u[j] & 0xFFFF0000u);
    } else {
      __half2 h2;
      memcpy(&h2, &u[j], 4);
      const float2 f2 = __half22float2(h2);
      f[2 * j] = f2.x;
      f[2 * j + 1] = f2.y;
    }
  }
}

// Step 2, m <= 32: thread owns columns j and j + p / 2 (consecutive threads, consecutive j).
__device__ void small_factor_regs(float* w, const float* h, int m, int mp, int p) {
  const int half = p / 2;
  for (int j = threadIdx.x; j < half; j += kHqThreads) {
    float z0[kSmallM], z1[kSmallM];
#pragma unroll
    for (int i = 0; i < kSmallM; ++i) {
      z0[i] = i < m ? w[padded(i * p + j)] : 0.f;
      z1[i] = i < m ? w[padded(i * p + j + half)] : 0.f;
    }
#pragma unroll
    for (int c = 0; c < kSmallM; c += kOut) {
      if (c >= m) break;
      float a0[kOut], a1[kOut];
#pragma unroll
      for (int q = 0; q < kOut; ++q) a0[q] = a1[q] = 0.f;
#pragma unroll
      for (int i = 0; i < kSmallM; ++i) {
        if (i < m) {
          const float4* hr = reinterpret_cast<const float4*>(h + i * mp + c);
#pragma unroll
          for (int q4 = 0; q4 < kOut / 4; ++q4) {
            const float4 hv = hr[q4];
            const float hq[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              a0[4 * q4 + e] = fmaf(hq[e], z0[i], a0[4 * q4 + e]);
              a1[4 * q4 + e] = fmaf(hq[e], z1[i], a1[4 * q4 + e]);
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kOut; ++q) {
        if (c + q < m) {
          w[padded((c + q) * p + j)] = a0[q];
          w[padded((c + q) * p + j + half)] = a1[q];
        }
      }
    }
  }
}

// Step 2, 32 < m: warp task t = (column block of 32, chunk of 16 outputs); every input is read
// before any output is written (one barrier), so the tasks need no order.
__device__ void small_factor_tasks(float* w, const float* h, int m, int mp, int p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col_blocks = (p + 31) / 32, chunks = mp / kOut;
  const int tasks = col_blocks * chunks;
  float out[kMaxTasks][kOut];
#pragma unroll
  for (int t = 0; t < kMaxTasks; ++t) {
    const int task = warp + t * kHqWarps;
    if (task < tasks) {
      const int c = (task % chunks) * kOut, j = (task / chunks) * 32 + lane;
#pragma unroll
      for (int q = 0; q < kOut; ++q) out[t][q] = 0.f;
      if (j < p) {
        for (int i = 0; i < m; ++i) {
          const float z = w[padded(i * p + j)];
          const float4* hr = reinterpret_cast<const float4*>(h + i * mp + c);
#pragma unroll
          for (int q4 = 0; q4 < kOut / 4; ++q4) {
            const float4 hv = hr[q4];
            out[t][4 * q4] = fmaf(hv.x, z, out[t][4 * q4]);
            out[t][4 * q4 + 1] = fmaf(hv.y, z, out[t][4 * q4 + 1]);
            out[t][4 * q4 + 2] = fmaf(hv.z, z, out[t][4 * q4 + 2]);
            out[t][4 * q4 + 3] = fmaf(hv.w, z, out[t][4 * q4 + 3]);
          }
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kMaxTasks; ++t) {
    const int task = warp + t * kHqWarps;
    if (task < tasks) {
      const int c = (task % chunks) * kOut, j = (task / chunks) * 32 + lane;
      if (j < p) {
#pragma unroll
        for (int q = 0; q < kOut; ++q) {
          if (c + q < m) w[padded((c + q) * p + j)] = out[t][q];
        }
      }
    }
  }
}

// Step 3: one radix-R pass at stride s over the whole row (segments of p are independent:
// the passes' strides multiply to p). Returns this thread's max |value| of the pass's outputs
// (the caller keeps the last pass's: the final values).
template <int R>
__device__ float fwht_pass(float* w, int n, int s) {
  float amax = 0.f;
  const int units = n / R;
  for (int u = threadIdx.x; u < units; u += kHqThreads) {
    const int lo = u % s, hi = u / s;
    const int base = hi * s * R + lo;
    float v[R];
#pragma unroll
    for (int k = 0; k < R; ++k) v[k] = w[padded(base + k * s)];
#pragma unroll
    for (int hh = 1; hh < R; hh *= 2) {
#pragma unroll
      for (int a = 0; a < R; ++a) {
        if ((a & hh) == 0) {
          const float x0 = v[a], x1 = v[a + hh];
          v[a] = x0 + x1;
          v[a + hh] = x0 - x1;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      w[padded(base + k * s)] = v[k];
      amax = fmaxf(amax, fabsf(v[k]));
    }
  }
  return amax;
}

__device__ float fwht(float* w, int n, int p) {
  float amax = 0.f;
  for (int s = 1; s < p; s *= 32) {
    const int r = p / s < 32 ? p / s : 32;
    switch (r) {
      case 32: amax = fwht_pass<32>(w, n, s); break;
      case 16: amax = fwht_pass<16>(w, n, s); break;
      case 8: amax = fwht_pass<8>(w, n, s); break;
      case 4: amax = fwht_pass<4>(w, n, s); break;
      default: amax = fwht_pass<2>(w, n, s); break;
    }
    __syncthreads();
  }
  return amax;  // p >= 32 (the binding's check): at least one pass ran
}

// --- tensor-core small factor (16-bit inputs)

template <typename T>
__device__ __forceinline__ uint32_t one_bits(float v) {  // +-1 or 0 as a 16-bit pattern
  const uint32_t one = std::is_same_v<T, __nv_bfloat16> ? 0x3F80u : 0x3C00u;
  return v == 0.f ? 0u : (v < 0.f ? (one | 0x8000u) : one);
}

// The A fragments of H^T (A[i'][i] = H[i][i'], zero for i >= m), tile (ti, kt) of 16 x 16 at
// frag[(ti * tiles + kt) * 32 + lane] in the m16n8k16 register layout: lane = 4 g + t holds
// (g, 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..), low half the lower column.
template <typename T>
__device__ void build_fragments(uint4* frag, const float* small, int m, int mp) {
  const int tiles = mp / 16;
  for (int idx = threadIdx.x; idx < tiles * tiles * 32; idx += kHqThreads) {
    const int tile = idx / 32, lane = idx % 32, g = lane / 4, t = lane % 4;
    const int r0 = (tile / tiles) * 16, c0 = (tile % tiles) * 16;
    auto val = [&](int r, int c) {
      const int i = c0 + c, ip = r0 + r;
      return i < m ? one_bits<T>(small[i * mp + ip]) : 0u;
    };
    auto pair = [&](int r, int c) { return val(r, c) | (val(r, c + 1) << 16); };
    frag[idx] = make_uint4(pair(g, 2 * t), pair(g + 8, 2 * t), pair(g, 2 * t + 8),
                           pair(g + 8, 2 * t + 8));
  }
}

// Step 2 on the tensor cores: warp task = (16 outputs i', 32 columns j); B from the staging
// buffer (signs applied, rows >= m zero), D to the fp32 row buffer.
template <typename T>
__device__ void small_factor_mma(float* w, const T* stage, const uint4* frag, int m, int mp,
                                 int p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int tiles = mp / 16, sp = stage_pitch(p);
  const int tasks = tiles * (p / 32);
  for (int task = warp; task < tasks; task += kHqWarps) {
    const int ti = task % tiles, j0 = (task / tiles) * 32;
    float acc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    for (int kt = 0; kt < tiles; ++kt) {
      const uint4 f = frag[(ti * tiles + kt) * 32 + lane];
      const uint32_t a[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // lanes 0-7: k rows 0-7 of n-tile 2 half; 8-15: k rows 8-15; 16-31: n-tile 2 half + 1
        const int row = kt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int col = j0 + half * 16 + (lane >> 4) * 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, stage + row * sp + col);
        mma16816<std::is_same_v<T, __nv_bfloat16>>(acc[2 * half], a, b[0], b[1]);
        mma16816<std::is_same_v<T, __nv_bfloat16>>(acc[2 * half + 1], a, b[2], b[3]);
      }
    }
    const int i0 = ti * 16 + g;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int j = j0 + nt * 8 + 2 * t;
      if (i0 < m) {
        w[padded(i0 * p + j)] = acc[nt][0];
        w[padded(i0 * p + j + 1)] = acc[nt][1];
      }
      if (i0 + 8 < m) {
        w[padded((i0 + 8) * p + j)] = acc[nt][2];
        w[padded((i0 + 8) * p + j + 1)] = acc[nt][3];
      }
    }
  }
}

template <typename T, bool STAGE, int BITS, bool MMA>
__global__ void __launch_bounds__(kHqThreads, 1) hadamard_quant_kernel(HqArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int n = a.n, p = a.p, words32 = (n + 31) / 32, sp = stage_pitch(p);
  T* stage = reinterpret_cast<T*>(smem);
  const size_t stage_bytes = STAGE ? static_cast<size_t>(a.mp) * sp * sizeof(T) : 0;
  float* w = reinterpret_cast<float*>(smem + stage_bytes);
  float* h = w + row_floats(n);                     // CUDA-core path: (m, mp) fp32
  uint4* frag = reinterpret_cast<uint4*>(h);        // MMA path: the A fragments
  const size_t h_bytes = MMA ? static_cast<size_t>(a.mp / 16) * (a.mp / 16) * 512
                             : static_cast<size_t>(a.m) * a.mp * 4;
  uint32_t* sbits = reinterpret_cast<uint32_t*>(reinterpret_cast<unsigned char*>(h) + h_bytes);
  float* red = reinterpret_cast<float*>(sbits + words32);
  const int tid = threadIdx.x;
  const T* x = static_cast<const T*>(a.x);
  const int chunks = n / 8;  // 16-byte copies of a 16-bit row; 8 elements per thread step

  if constexpr (MMA) {
    build_fragments<T>(frag, a.small, a.m, a.mp);
  } else {
    for (int i = tid; i < a.m * a.mp; i += kHqThreads) h[i] = a.small[i];
  }
  for (int wd = tid; wd < words32; wd += kHqThreads) {
    uint32_t bits = 0;
    for (int b = 0; b < 32 && wd * 32 + b < n; ++b) {
      bits |= (a.signs[wd * 32 + b] < 0.f ? 1u : 0u) << b;
    }
    sbits[wd] = bits;
  }
  if constexpr (STAGE) {  // padding rows m..mp-1 of the staging buffer: zero K rows of the MMA
    for (int e = tid; e < (a.mp - a.m) * sp; e += kHqThreads) {
      reinterpret_cast<uint16_t*>(stage)[a.m * sp + e] = 0;
    }
  }
  // the staging address of 8-element chunk c (segment i = 8c / p, column j = 8c % p)
  auto staged = [&](int c) { return stage + (8 * c / p) * sp + (8 * c) % p; };
  auto copy_row = [&](int64_t r) {
    if constexpr (STAGE) {
      if (r < a.rows) {
        const uint4* src = reinterpret_cast<const uint4*>(x + r * n);
        for (int c = tid; c < chunks; c += kHqThreads) cp_async16(staged(c), src + c);
      }
      cp_async_commit();
    }
  };
  int64_t row = blockIdx.x;
  copy_row(row);
  for (; row < a.rows; row += gridDim.x) {
    if constexpr (STAGE) cp_async_wait_all();
    __syncthreads();  // the staged row is visible; the previous row's readers of w are done
    if constexpr (MMA) {
      // 1-2. the signs in the staging buffer, then the small factor into w
      for (int c = tid; c < chunks; c += kHqThreads) {
        uint4* q = reinterpret_cast<uint4*>(staged(c));
        const uint32_t bits = sbits[(8 * c) >> 5] >> ((8 * c) & 31);
        uint4 v = *q;
        v.x ^= ((bits & 1u) << 15) | (((bits >> 1) & 1u) << 31);
        v.y ^= (((bits >> 2) & 1u) << 15) | (((bits >> 3) & 1u) << 31);
        v.z ^= (((bits >> 4) & 1u) << 15) | (((bits >> 5) & 1u) << 31);
        v.w ^= (((bits >> 6) & 1u) << 15) | (((bits >> 7) & 1u) << 31);
        *q = v;
      }
      __syncthreads();
      small_factor_mma<T>(w, stage, frag, a.m, a.mp, p);
      __syncthreads();
      copy_row(row + gridDim.x);  // the next row's copy overlaps the rest of this one
    } else {
      // 1. the row, signs applied, into w
      for (int v = tid; v < chunks; v += kHqThreads) {
        float f[8];
        if constexpr (std::is_same_v<T, float>) {
          const float4* src = reinterpret_cast<const float4*>(x + row * n + 8 * v);
          const float4 lo = src[0], hi = src[1];
          f[0] = lo.x; f[1] = lo.y; f[2] = lo.z; f[3] = lo.w;
          f[4] = hi.x; f[5] = hi.y; f[6] = hi.z; f[7] = hi.w;
        } else {
          to_float8<T>(*reinterpret_cast<const uint4*>(staged(v)), f);
        }
        const uint32_t bits = sbits[(8 * v) >> 5] >> ((8 * v) & 31);
        const int base = padded(8 * v);  // eight elements inside one 32-element block
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          w[base + j] = __uint_as_float(__float_as_uint(f[j]) ^ (((bits >> j) & 1u) << 31));
        }
      }
      __syncthreads();
      copy_row(row + gridDim.x);  // the next row's copy overlaps this row's arithmetic
      // 2. the small factor
      if (a.m > 1) {
        if (a.m <= kSmallM) small_factor_regs(w, h, a.m, a.mp, p);
        else small_factor_tasks(w, h, a.m, a.mp, p);
        __syncthreads();
      }
    }
    // 3. the power-of-two factor and the row maximum
    float amax = fwht(w, n, p);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    if (tid % 32 == 0) red[tid / 32] = amax;
    __syncthreads();
    amax = red[0];
#pragma unroll
    for (int k = 1; k < kHqWarps; ++k) amax = fmaxf(amax, red[k]);
    // 4. the scale (cbq_kernels.quant_math.act_step) and the codes
    const float s = act_step(amax, a.inv_sqrt_n, a.ratio, a.qmax);
    const float inv_s = __fdiv_rn(1.0f, s);
    if (tid == 0) a.scales[row] = s;
    for (int v = tid; v < chunks; v += kHqThreads) {
      const int base = padded(8 * v);
      int q[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float u = __fmul_rn(__fmul_rn(w[base + j], a.inv_sqrt_n), inv_s);
        u = fminf(fmaxf(u, -4194304.0f), 4194304.0f);
        q[j] = static_cast<int>(fminf(fmaxf(rintf(u), -a.qmax - 1.0f), a.qmax));
      }
      if constexpr (BITS == 8) {
        uint2 out;
        out.x = (q[0] & 0xFF) | ((q[1] & 0xFF) << 8) | ((q[2] & 0xFF) << 16) |
                (static_cast<uint32_t>(q[3] & 0xFF) << 24);
        out.y = (q[4] & 0xFF) | ((q[5] & 0xFF) << 8) | ((q[6] & 0xFF) << 16) |
                (static_cast<uint32_t>(q[7] & 0xFF) << 24);
        reinterpret_cast<uint2*>(a.codes + row * (n / 4))[v] = out;
      } else {
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) word |= static_cast<uint32_t>(q[j] + 8) << (4 * j);
        a.codes[row * (n / 8) + v] = static_cast<int32_t>(word);
      }
    }
  }
  if constexpr (STAGE) cp_async_wait_all();
}

template <typename T, bool STAGE, bool MMA>
void hq_launch(const HqArgs& a, int bits, size_t smem, int device, int blocks,
               cudaStream_t stream) {
  const auto kernel = bits == 8 ? hadamard_quant_kernel<T, STAGE, 8, MMA>
                                : hadamard_quant_kernel<T, STAGE, 4, MMA>;
  static std::atomic<int> allowed[2][kMaxDevices] = {};  // per kernel (bits) and device
  allow_smem(kernel, smem, device, allowed[bits == 8]);
  kernel<<<blocks, kHqThreads, smem, stream>>>(a);
}

}  // namespace

int64_t hadamard_quant_smem_bytes(int64_t n, int64_t m, int64_t mp, int64_t p, int in_dtype,
                                  bool mma) {
  const int64_t words32 = (n + 31) / 32;
  const bool fp32 = in_dtype == static_cast<int>(DType::kFloat32);
  if (mma && fp32) return -1;  // the tensor-core path takes 16-bit inputs
  if (!mma && m > kSmallM && (p + 31) / 32 * (mp / kOut) > kMaxTasks * kHqWarps) return -1;
  const int64_t stage = fp32 ? 0 : 2 * mp * stage_pitch(static_cast<int>(p));
  const int64_t small = mma ? (mp / 16) * (mp / 16) * 512 : 4 * m * mp;
  return stage + 4 * row_floats(static_cast<int>(n)) + small + 4 * words32 + 4 * kHqWarps;
}

void hadamard_quant_cuda(const void* x, const float* signs, const float* small, int32_t* codes,
                         float* scales, int64_t rows, int64_t n, int64_t m, int64_t mp,
                         int64_t p, int bits, int in_dtype, bool mma, float ratio,
                         float inv_sqrt_n, int device, std::uintptr_t stream) {
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  int sms = 0, smem_max = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
           "shared memory limit");
  const int64_t smem = hadamard_quant_smem_bytes(n, m, mp, p, in_dtype, mma);
  if (smem < 0 || smem > smem_max) {
    if (previous != device) cudaSetDevice(previous);
    throw std::invalid_argument(
        "cbq_kernels._C: hadamard_quant_cuda: width " + std::to_string(n) +
        " with a small factor of " + std::to_string(m) + (mma ? " (tensor cores)" : "") +
        (smem < 0 ? " is not taken (the tensor-core path takes 16-bit inputs; the CUDA-core "
                    "path at most " + std::to_string(kMaxTasks * kHqWarps) +
                    " tasks of 32 columns x 16 outputs)"
                  : " needs " + std::to_string(smem) +
                    " bytes of shared memory, the device has " + std::to_string(smem_max)));
  }
  const HqArgs a =
      hq_common(x, signs, small, codes, scales, rows, n, m, mp, p, bits, ratio, inv_sqrt_n);
  const int blocks = static_cast<int>(rows < sms ? rows : sms);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (rows > 0) {
    if (in_dtype == static_cast<int>(DType::kBFloat16)) {
      if (mma) hq_launch<__nv_bfloat16, true, true>(a, bits, smem, device, blocks, s);
      else hq_launch<__nv_bfloat16, true, false>(a, bits, smem, device, blocks, s);
    } else if (in_dtype == static_cast<int>(DType::kFloat16)) {
      if (mma) hq_launch<__half, true, true>(a, bits, smem, device, blocks, s);
      else hq_launch<__half, true, false>(a, bits, smem, device, blocks, s);
    } else {
      hq_launch<float, false, false>(a, bits, smem, device, blocks, s);
    }
  }
  const cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check(err, "hadamard_quant launch");
}

}  // namespace cbq
