// Decode GEMM (M <= 16) on tensor cores for 4-bit and 2-bit weights: W4A16 / W2A16 with bf16 or
// fp16 activations, and W4A8 / W4A4 with integer activation codes (exact in bf16).
//
// Why a CUDA kernel: the Triton decode kernel converts codes with shift, mask and int-to-float
// per code and reshapes the unpacked tile through shared memory; at M = 1 it runs at ~9 codes
// per clock per SM, the same time on the H100 and the H200 although the H200 has 1.45x the
// bandwidth (issue 13's table; benchmarks/results/h200/bench_gemm.csv and the H100 sweep in
// benchmarks/results/h100/sweep_gemm_decode_*.txt): the unpack, not memory, sets the time.
// Here every code costs about 1.5 instructions:
//  - the weight is reordered offline (cbq_kernels/gemm_decode.py, prepare_decode) so that one
//    16-byte load per thread holds exactly the B fragments of its mma.sync instructions for a
//    16 (K) x TN (N) tile: no shared memory, no reshape, one fully coalesced 512-byte warp load;
//  - two codes are converted at once: ((word >> shift) & 0x000F000F) | 0x43004300 is a pair of
//    bf16 values 128 + q (a bf16 with exponent 2^7 has a unit in the last place of 1, so the
//    code lands in the mantissa), and one subtraction of the pair (128 + z, 128 + z) leaves
//    q - z exactly (fp16: 0x6400 = 1024). The AND/OR pair compiles to one LOP3.
//
// Layout (prepare_decode documents the same in Python, and its emulator test checks it):
//   BITS 4: NSUB = 8 subtiles of 8 columns per n-tile (TN = 64); BITS 2: NSUB = 16 (TN = 128).
//   words: int32 [N_pad / TN][K_pad / 16][32 lanes][4 words]. Lane l = 4 g + t holds in word j,
//   pair p (p < 16 / BITS) the two codes at bits BITS*p (low half) and 16 + BITS*p (high
//   half); pair P = j * (16 / BITS) + p is subtile s = P / 2, half h = P % 2, and its codes are
//   W[n0 + 8 s + g][k0 + 8 h + 2 t] (low) and W[n0 + 8 s + g][k0 + 8 h + 2 t + 1] (high): the
//   B operand registers b0 (h = 0) and b1 (h = 1) of mma.m16n8k16 for column g of subtile s.
//   scales: fp32 [G][N_pad]; zeros: int32 [G][N_pad] (padding: scale 0, zero 0, codes 0).
//
// Work split: block = 4 warps on one n-tile; grid (N_pad / TN, S). Split s of S owns a range
// of k-steps, cut in 4 contiguous warp ranges. Warps reduce through shared memory in a fixed
// order; with S > 1 each block writes its partial sums to a workspace and the last block of
// the n-tile (an atomic counter, reset by that block) adds the S partials in order 0..S-1:
// one launch, deterministic.
//
// Integer modes: products of integer codes are exact in fp32 and the MMA accumulates them in
// fp32; a warp's fp32 sum is moved into an int32 accumulator at least every 256 k-steps
// (4096 products of |x| <= 127, |q - z| <= 15: < 7.8e6 < 2^24), so the int32 result equals
// x_codes @ (q - z)^T exactly (debug returns it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/ops.h"

namespace cbq {
namespace {

constexpr int kWarps = 4;
constexpr int kDepth = 4;         // k-steps whose weight loads are in flight ahead of the MMAs
constexpr int kIntSegment = 256;  // k-steps between fp32 -> int32 moves (exactness, above)

enum AMode : int { kABf16 = 0, kAFp16 = 1, kAInt8 = 2, kAInt4 = 3 };

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cbq_kernels._C: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

__device__ __forceinline__ __nv_bfloat162 make_pair(float lo, float hi, __nv_bfloat162*) {
  return __floats2bfloat162_rn(lo, hi);
}
__device__ __forceinline__ __half2 make_pair(float lo, float hi, __half2*) {
  return __floats2half2_rn(lo, hi);
}

// Pair arithmetic and the MMA for one 16-bit type (T2: __nv_bfloat162 or __half2); the
// registers travel as uint32_t, as mma.sync takes them.
template <typename T2>
struct MmaOps {
  static constexpr bool kBf16 = std::is_same<T2, __nv_bfloat162>::value;
  // a pair of (128, 128) in bf16 (unit in the last place 1 at 2^7), (1024, 1024) in fp16
  static constexpr uint32_t kMagic2 = kBf16 ? 0x43004300u : 0x64006400u;
  static constexpr float kMagic = kBf16 ? 128.0f : 1024.0f;
  __device__ static T2 as_pair(uint32_t v) { return *reinterpret_cast<T2*>(&v); }
  __device__ static uint32_t as_bits(T2 v) { return *reinterpret_cast<uint32_t*>(&v); }
  __device__ static uint32_t pack(float lo, float hi) {
    return as_bits(make_pair(lo, hi, static_cast<T2*>(nullptr)));
  }
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    return as_bits(__hsub2(as_pair(a), as_pair(b)));
  }
  __device__ static uint32_t mul(uint32_t a, uint32_t b) {
    return as_bits(__hmul2(as_pair(a), as_pair(b)));
  }
  __device__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) {
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
};

template <int AM>
struct Mma : MmaOps<__nv_bfloat162> {};  // bf16 activations, and integer codes (below)
template <>
struct Mma<kAFp16> : MmaOps<__half2> {};

// Integer activation codes go through the bf16 MMA (exact for |code| <= 256): the primary
// template above.

// Streaming 16-byte load of weights (read once: do not keep them in L1, where x lives).
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// The A fragment of mma.m16n8k16 (row-major 16 x 16) at k-step k0: a[0] rows g, columns
// 2t, 2t+1; a[1] row g + 8; a[2] / a[3] the same rows, columns 2t + 8, 2t + 9. Rows >= M and
// columns >= K are zero.
template <int AM>
__device__ __forceinline__ void load_a(uint32_t* a, const void* x, int m, int k, int64_t ldx,
                                       int k0, int g, int t) {
  const int rows[2] = {g, g + 8};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = rows[i & 1];
    const int col = k0 + 2 * t + (i >> 1) * 8;
    uint32_t v = 0;
    if (row < m && col < k) {  // k is even: col + 1 < k too
      if constexpr (AM == kABf16 || AM == kAFp16) {
        v = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(x) +
                                                    row * ldx + col));
      } else if constexpr (AM == kAInt8) {
        const uint16_t two =
            __ldg(reinterpret_cast<const uint16_t*>(static_cast<const int8_t*>(x) + row * ldx +
                                                    col));
        const int lo = static_cast<int8_t>(two & 0xFF), hi = static_cast<int8_t>(two >> 8);
        v = Mma<AM>::pack(static_cast<float>(lo), static_cast<float>(hi));
      } else {  // packed int4 codes, offset 8, 8 per int32 word (ldx = words per row)
        const uint32_t word = __ldg(static_cast<const uint32_t*>(x) + row * ldx + col / 8);
        const int shift = (col % 8) * 4;
        const int lo = static_cast<int>((word >> shift) & 0xF) - 8;
        const int hi = static_cast<int>((word >> (shift + 4)) & 0xF) - 8;
        v = Mma<AM>::pack(static_cast<float>(lo), static_cast<float>(hi));
      }
    }
    a[i] = v;
  }
}

struct Args {
  const void* x;          // (M, K) bf16 / fp16 / int8, or (M, ceil(K / 8)) int32 (int4)
  const float* x_scales;  // (M,) integer modes
  const uint4* words;     // the decode layout above
  const float* scales;    // (G, N_pad)
  const int32_t* zeros;   // (G, N_pad)
  const float* bias;      // (N,) or null
  void* out;              // (M, N) out_dtype, or int32 (debug)
  float* ws_f;            // (S, 16, N_pad) partial sums (S > 1)
  int32_t* ws_i;          // (S, 16, N_pad) integer partials (integer modes, S > 1)
  int32_t* counters;      // (N_pad / TN,) zero on entry, left zero
  int m, n, k, n_pad, k_steps, group_steps, splits;
  int64_t ldx;
  int out_dtype;  // DType
  bool debug;
};

__device__ __forceinline__ void store_out(void* out, int64_t i, float v, int dtype) {
  if (dtype == static_cast<int>(DType::kFloat32)) {
    static_cast<float*>(out)[i] = v;
  } else if (dtype == static_cast<int>(DType::kFloat16)) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

// y[m, n] from the reduced sums: fv (float accumulator: scaled per group already when
// grouped) and iv (int32 accumulator of the integer modes).
template <int AM, bool GROUPED>
__device__ __forceinline__ void finish(const Args& p, int row, int col, float fv, int32_t iv) {
  const int64_t i = static_cast<int64_t>(row) * p.n + col;
  constexpr bool kInt = AM == kAInt8 || AM == kAInt4;
  if (kInt && p.debug) {
    static_cast<int32_t*>(p.out)[i] = iv;
    return;
  }
  float y;
  if constexpr (kInt) {
    y = GROUPED ? fv * p.x_scales[row]
                : static_cast<float>(iv) * p.x_scales[row] * p.scales[col];
  } else {
    y = GROUPED ? fv : fv * p.scales[col];
  }
  if (p.bias != nullptr) y += p.bias[col];
  store_out(p.out, i, y, p.out_dtype);
}

template <int BITS, int AM, bool GROUPED>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(Args p) {
  constexpr int kPairsPerWord = 16 / BITS;
  constexpr int kSub = 32 / BITS;  // 8-column subtiles per n-tile
  constexpr int kTN = 8 * kSub;
  constexpr uint32_t kMask2 = BITS == 4 ? 0x000F000Fu : 0x00030003u;
  constexpr bool kInt = AM == kAInt8 || AM == kAInt4;
  using M = Mma<AM>;

  __shared__ float sm_f[kWarps][16][kTN];
  __shared__ int32_t sm_i[kInt ? kWarps : 1][16][kInt ? kTN : 1];
  __shared__ bool last_block;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x, split = blockIdx.y;
  const int n0 = nt * kTN;

  // this warp's k-steps: split `split` of S, then quarter `warp` of it
  const int per_split = (p.k_steps + p.splits - 1) / p.splits;
  const int s_begin = min(split * per_split, p.k_steps);
  const int s_end = min(s_begin + per_split, p.k_steps);
  const int per_warp = (s_end - s_begin + kWarps - 1) / kWarps;
  const int kb = min(s_begin + warp * per_warp, s_end);
  const int ke = min(kb + per_warp, s_end);

  float acc[kSub][4];   // float modes: the output; integer grouped: scaled per group
  float tmp[kSub][4];   // integer modes: the fp32 sum of the current segment
  int32_t acci[kSub][4];
#pragma unroll
  for (int s = 0; s < kSub; ++s) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      acc[s][r] = 0.f;
      tmp[s][r] = 0.f;
      acci[s][r] = 0;
    }
  }

  // per-column constants of the current group: (MAGIC + z) pairs for the B columns this
  // thread converts (column 8 s + g), and for grouped float modes the scale pairs
  uint32_t zb[kSub];
  uint32_t sb[kSub];
  int group = -1;
  auto load_group = [&](int gi) {
#pragma unroll
    for (int s = 0; s < kSub; ++s) {
      const int64_t off = static_cast<int64_t>(gi) * p.n_pad + n0 + 8 * s + g;
      const float z = M::kMagic + static_cast<float>(__ldg(p.zeros + off));
      zb[s] = M::pack(z, z);
      if constexpr (GROUPED && !kInt) {
        const float sc = __ldg(p.scales + off);
        sb[s] = M::pack(sc, sc);
      }
    }
    group = gi;
  };
  // integer modes: move the segment's fp32 sums into the int32 (and scaled) accumulators
  auto flush = [&](int gi) {
    if constexpr (kInt) {
#pragma unroll
      for (int s = 0; s < kSub; ++s) {
        float2 sc = make_float2(0.f, 0.f);
        if constexpr (GROUPED) {
          sc = __ldg(reinterpret_cast<const float2*>(
              p.scales + static_cast<int64_t>(gi) * p.n_pad + n0 + 8 * s + 2 * t));
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          acci[s][r] += __float2int_rn(tmp[s][r]);
          if constexpr (GROUPED) acc[s][r] += tmp[s][r] * ((r & 1) ? sc.y : sc.x);
          tmp[s][r] = 0.f;
        }
      }
    }
  };

  const uint4* base = p.words + (static_cast<int64_t>(nt) * p.k_steps) * 32 + lane;
  uint4 cur[kDepth], nxt[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    if (kb + d < ke) cur[d] = load_weights(base + static_cast<int64_t>(kb + d) * 32);
  }
  int seg_start = kb;
  for (int kc = kb; kc < ke; kc += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (kc + kDepth + d < ke) {
        nxt[d] = load_weights(base + static_cast<int64_t>(kc + kDepth + d) * 32);
      }
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int ks = kc + d;
      if (ks < ke) {
        const int gi = ks / p.group_steps;
        if (gi != group) {
          if (kInt && group >= 0) {
            flush(group);
            seg_start = ks;
          }
          load_group(gi);
        } else if (kInt && ks - seg_start >= kIntSegment) {
          flush(group);
          seg_start = ks;
        }
        uint32_t a[4];
        load_a<AM>(a, p.x, p.m, p.k, p.ldx, ks * 16, g, t);
        const uint32_t w4[4] = {cur[d].x, cur[d].y, cur[d].z, cur[d].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int pp = 0; pp < kPairsPerWord; pp += 2) {
            const int s = (j * kPairsPerWord + pp) / 2;
            uint32_t b0 = ((w4[j] >> (BITS * pp)) & kMask2) | M::kMagic2;
            uint32_t b1 = ((w4[j] >> (BITS * (pp + 1))) & kMask2) | M::kMagic2;
            b0 = M::sub(b0, zb[s]);
            b1 = M::sub(b1, zb[s]);
            if constexpr (GROUPED && !kInt) {
              b0 = M::mul(b0, sb[s]);
              b1 = M::mul(b1, sb[s]);
            }
            M::mma(kInt ? tmp[s] : acc[s], a, b0, b1);
          }
        }
      }
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) cur[d] = nxt[d];
  }
  if (kInt && group >= 0) flush(group);

  // reduce the 4 warps through shared memory, in warp order
#pragma unroll
  for (int s = 0; s < kSub; ++s) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r >> 1) * 8, col = 8 * s + 2 * t + (r & 1);
      sm_f[warp][row][col] = acc[s][r];
      if constexpr (kInt) sm_i[warp][row][col] = acci[s][r];
    }
  }
  __syncthreads();
  const int items = p.m * kTN;
  if (p.splits == 1) {
    for (int e = threadIdx.x; e < items; e += blockDim.x) {
      const int row = e / kTN, col = e % kTN;
      if (n0 + col >= p.n) continue;
      float fv = 0.f;
      int32_t iv = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        fv += sm_f[w][row][col];
        if constexpr (kInt) iv += sm_i[w][row][col];
      }
      finish<AM, GROUPED>(p, row, n0 + col, fv, iv);
    }
    return;
  }
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kTN, col = e % kTN;
    float fv = 0.f;
    int32_t iv = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      fv += sm_f[w][row][col];
      if constexpr (kInt) iv += sm_i[w][row][col];
    }
    const int64_t o = (static_cast<int64_t>(split) * 16 + row) * p.n_pad + n0 + col;
    p.ws_f[o] = fv;
    if constexpr (kInt) p.ws_i[o] = iv;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last_block = atomicAdd(p.counters + nt, 1) == p.splits - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kTN, col = e % kTN;
    if (n0 + col >= p.n) continue;
    float fv = 0.f;
    int32_t iv = 0;
    for (int sp = 0; sp < p.splits; ++sp) {
      const int64_t o = (static_cast<int64_t>(sp) * 16 + row) * p.n_pad + n0 + col;
      fv += __ldcg(p.ws_f + o);
      if constexpr (kInt) iv += __ldcg(p.ws_i + o);
    }
    finish<AM, GROUPED>(p, row, n0 + col, fv, iv);
  }
  if (threadIdx.x == 0) p.counters[nt] = 0;
}

template <int BITS, int AM>
void launch(const Args& p, bool grouped, cudaStream_t stream) {
  constexpr int kTN = 8 * (32 / BITS);
  const dim3 grid(p.n_pad / kTN, p.splits);
  if (grouped) {
    decode_kernel<BITS, AM, true><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    decode_kernel<BITS, AM, false><<<grid, kWarps * 32, 0, stream>>>(p);
  }
}

}  // namespace

int decode_tile_n(int bits) { return 8 * (32 / (bits == 2 ? 2 : 4)); }

void gemm_decode_cuda(const void* x, const float* x_scales, int a_mode, const int32_t* words,
                      const float* scales, const int32_t* zeros, const float* bias, void* out,
                      float* ws_f, int32_t* ws_i, int32_t* counters, int64_t m, int64_t n,
                      int64_t k, int64_t n_pad, int64_t ldx, int bits, int64_t group_size,
                      int splits, int out_dtype, bool debug, int device, std::uintptr_t stream) {
  int previous = 0;
  check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  Args p{};
  p.x = x;
  p.x_scales = x_scales;
  p.words = reinterpret_cast<const uint4*>(words);
  p.scales = scales;
  p.zeros = zeros;
  p.bias = bias;
  p.out = out;
  p.ws_f = ws_f;
  p.ws_i = ws_i;
  p.counters = counters;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.n_pad = static_cast<int>(n_pad);
  p.k_steps = static_cast<int>((k + 15) / 16);
  const bool grouped = group_size < k;
  p.group_steps = static_cast<int>(grouped ? group_size / 16 : p.k_steps);
  p.splits = splits;
  p.ldx = ldx;
  p.out_dtype = out_dtype;
  p.debug = debug;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (bits == 2) {
    if (a_mode == kABf16) launch<2, kABf16>(p, grouped, s);
    else launch<2, kAFp16>(p, grouped, s);
  } else if (a_mode == kABf16) {
    launch<4, kABf16>(p, grouped, s);
  } else if (a_mode == kAFp16) {
    launch<4, kAFp16>(p, grouped, s);
  } else if (a_mode == kAInt8) {
    launch<4, kAInt8>(p, grouped, s);
  } else {
    launch<4, kAInt4>(p, grouped, s);
  }
  const cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check_cuda(err, "gemm_decode launch");
}

}  // namespace cbq
