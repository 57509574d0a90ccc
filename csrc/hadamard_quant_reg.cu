// Online Hadamard rotation fused with per-token activation quantization, register version
// (issue 15's kernel target: >= 80% of the copy bandwidth at 8192 x 11008 and 8192 x 28672).
// The contract is cbq_kernels/hadamard_quant.py's, as for csrc/hadamard_quant.cu:
//   y = (x * signs) (H_m (x) H_p) / sqrt(n),   n = m p, p = 2^j,
//   r = max |y|,  s = max(ratio r / P, max(2^-20 r, 1e-8)),  q = clamp(round(y / s), -P-1, P).
//
// Why a second kernel: csrc/hadamard_quant.cu ran at 12.1% (11008) and 18.5% (28672) of the
// copy bandwidth on the H200, and its ncu reading (benchmarks/results/h200/
// ncu_hadamard_7a9193f.txt) says why: 64 instructions per element, the integer ALU pipe the
// busiest (the padded index math of an fp32 row buffer that every butterfly pass reads and
// writes), one 190-KB block of 8 warps per SM issuing every 1.9 cycles. Here the fp32 row
// never goes to shared memory:
//  - the width is viewed as (m' = m f) segments of pw = min(p, 128) elements, f = p / pw, and
//    H_m (x) H_p = (H_m (x) H_f) (x) H_pw (Sylvester: H_p = H_f (x) H_pw). The first factor
//    (the "small" one, m' <= 256) runs on the tensor cores: one warp per 16 output segments,
//    mma.m16n8k16 with its +-1 fragment rebuilt from 8 sign bits per lane and k-tile (two
//    instructions per register), x from the staging buffer by ldmatrix.trans; 16-bit x and +-1
//    are exact operands, the sums fp32;
//  - H_pw runs on the accumulators where the MMA left them: a lane holds columns 8 nt + 2 t
//    + e of rows g and g + 8, so column bit 0 (e) and bits 3.. (nt) are butterflies inside a
//    thread and bits 1-2 (t) are two shuffle stages (a shfl and an fma per value);
//  - the row maximum is a warp reduction then one value per warp in shared memory; the codes
//    are rounded with the 1.5 2^23 trick (an fadd; no F2I, which runs at a quarter rate) and
//    go through a small code buffer so that global stores are whole 16-byte chunks;
//  - rows are copied two ahead of use (cp.async, double-buffered staging), the signs applied
//    by one xor pass over the staged row with precomputed per-chunk masks.
// Cost estimate (instructions per element): MMA and ldmatrix ~0.3 (warp-level, amortised),
// butterflies ~9 at pw = 128 (5 in-thread stages, 2 shuffle stages at 2), quantizer ~6, sign
// pass ~1.3: ~17, against 64. What it costs elsewhere: the small factor grows to m' = m f
// (224 multiply-adds per element at 28672 = 28 x 8 x 128, on the tensor cores), and every
// warp reads the whole staged row (m' / 16 times per row from shared memory).
//
// The factors' order and the fp32 sums differ from the reference's, so a code can differ by
// one level where y / s lies within ~1e-6 of a rounding boundary and a scale in its last bits:
// the contract of the other kernels, which the same GPU tests check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/format.h"
#include "cbq/hadamard_common.cuh"
#include "cbq/ops.h"

namespace cbq {
namespace {

using namespace hreg;

constexpr int kRegMaxWarps = 16;     // a block: R rows x (m' / 16) warps, at most 512 threads
constexpr int kRegMaxTiles = 16;     // m' <= 256: four 32-bit words of A signs per lane
constexpr int kRegMaxPw = 128;       // a warp's accumulators: pw / 2 floats per lane

struct RegShape {
  int pw, f, mq, tiles, mt, wpr, rows_per_block, warps;
};

// pw = min(p, 128), f = p / pw, m' = m f, tiles = ceil(m' / 16); mt m-tiles per warp (2 only
// for pw <= 64: 2 x pw / 2 accumulators), wpr = ceil(tiles / mt) warps per row, R = max(1,
// 16 / wpr) rows per block; pw < 32, m' > 256 or mt = 2 at pw = 128 are not taken (tiles 0).
RegShape reg_shape(int64_t m, int64_t p, int mt) {
  RegShape s{};
  s.pw = static_cast<int>(p < kRegMaxPw ? p : kRegMaxPw);
  s.f = static_cast<int>(p / s.pw);
  s.mq = static_cast<int>(m * s.f);
  s.tiles = (s.mq + 15) / 16;
  s.mt = mt;
  if (s.pw < 32 || s.tiles > kRegMaxTiles || (mt == 2 && s.pw > 64) || mt < 1 || mt > 2) {
    s.tiles = 0;
    return s;
  }
  s.wpr = (s.tiles + mt - 1) / mt;
  s.rows_per_block = s.wpr >= kRegMaxWarps ? 1 : kRegMaxWarps / s.wpr;
  s.warps = s.rows_per_block * s.wpr;
  return s;
}

__host__ __device__ __forceinline__ int reg_stage_pitch(int pw) { return pw + 8; }  // 16-bit
// bytes per code row of a segment, padded so that the fragment-layout stores (8 rows g of a
// warp at once) land in distinct banks and rows stay 16-byte aligned
__host__ __device__ __forceinline__ int reg_code_pitch(int pw, int bits) {
  const int seg = bits == 8 ? pw : pw / 2;
  int pitch = seg + 16;
  if ((pitch / 4) % 8 == 0) pitch += 16;
  return pitch;
}

struct RegLayout {  // byte offsets in dynamic shared memory
  int64_t stage_elems;  // one buffer: R x (tiles 16) x pitch 16-bit values
  int64_t stage, pmask, abits, cbuf, red, total;
};

RegLayout reg_layout(int64_t n, const RegShape& s, int bits) {
  RegLayout l{};
  l.stage_elems = static_cast<int64_t>(s.rows_per_block) * s.tiles * 16 * reg_stage_pitch(s.pw);
  l.stage = 0;
  l.pmask = l.stage + 2 * l.stage_elems * 2;
  l.abits = l.pmask + (n / 8) * 4;
  l.cbuf = l.abits + static_cast<int64_t>(s.warps) * s.mt * (kRegMaxTiles / 4) * 32 * 4;
  l.red = l.cbuf + (static_cast<int64_t>(s.rows_per_block) * s.mq * reg_code_pitch(s.pw, bits) + 15) /
                       16 * 16;
  l.total = l.red + 4 * s.warps;
  return l;
}

struct RegArgs : HqCommon {
  int f, mq, tiles, wpr, R;
  RegLayout l;
};

// Whether H'[k][o] < 0 for H' = H_m (x) H_f: k = i f + a, o = i' f + b (f a power of two),
// H'[k][o] = H_m[i][i'] (-1)^popc(a & b). Outside m' (padding): +1 (the staged rows k >= m'
// are zero; outputs o >= m' are not used).
__device__ __forceinline__ bool reg_negative(const RegArgs& a, int k, int o) {
  if (k >= a.mq || o >= a.mq) return false;
  const int i = k / a.f, ib = k % a.f, io = o / a.f, ob = o % a.f;
  return (a.small[i * a.mp + io] < 0.f) ^ (__popc(ib & ob) & 1);
}

// The A operand of H'^T (A[o][k] = H'[k][o]) for this lane's m-tile, as sign bits: k-tile kt's
// register r (0..3: rows g / g + 8, columns 2t.. / 2t + 8..) keeps its low element's bit at
// 15 - r - 4 (kt % 4) of word kt / 4 and its high element's at 31 - r - 4 (kt % 4), so that
// (word << (r + 4 (kt % 4))) & 0x80008000 is the register's two sign bits.
// Kept in shared memory, word w of lane l at sb[w * 32 + l] (conflict-free; one load per four
// k-tiles): in registers, the pw = 128 kernel spilled 600 bytes at the 128-register cap that
// 16 warps per block set (ptxas, sm_90a).
__device__ __forceinline__ void reg_a_bits(const RegArgs& a, int tile, uint32_t* sb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int w = 0; w < kRegMaxTiles / 4; ++w) {
    uint32_t bits = 0;
    for (int q = 0; q < 4 && 4 * w + q < a.tiles; ++q) {
      const int kt = 4 * w + q;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int o = tile * 16 + g + (r & 1) * 8, k = kt * 16 + 2 * t + (r >> 1) * 8;
        if (reg_negative(a, k, o)) bits |= sign_bits_at(q, r, 0);
        if (reg_negative(a, k + 1, o)) bits |= sign_bits_at(q, r, 1);
      }
    }
    sb[w * 32 + lane] = bits;
  }
}

// MT m-tiles per warp (variant 3: MT = 2 at pw <= 64): the B fragments of each k-tile, loaded
// once, feed both tiles' MMAs, so the staged row is read wpr = ceil(tiles / 2) times instead
// of tiles times (11008: 6 against 11 reads of 22.5 KB; with 11 the ~336 KB of shared-memory
// traffic per row is ~2630 cycles per SM, about all of the ~2650 that 80% of the copy
// bandwidth allows at 8192 rows).
template <typename T, int NT, int BITS, int MT>
__global__ void __launch_bounds__(kRegMaxWarps * 32, 1) hadamard_quant_reg_kernel(RegArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int PW = NT * 8;
  constexpr int SP = PW + 8;  // reg_stage_pitch
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr uint32_t kOne = kBf16 ? 0x3F803F80u : 0x3C003C00u;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int n = a.n, R = a.R, tiles = a.tiles, mq = a.mq, wpr = a.wpr;
  const int chunks = n / 8;  // 16-byte pieces of a row
  const int cpitch = reg_code_pitch(PW, BITS);
  const int nthreads = blockDim.x;
  uint16_t* stage_base = reinterpret_cast<uint16_t*>(smem + a.l.stage);
  uint32_t* pmask = reinterpret_cast<uint32_t*>(smem + a.l.pmask);
  unsigned char* cbuf = smem + a.l.cbuf;
  float* red = reinterpret_cast<float*>(smem + a.l.red);
  const int row_elems = tiles * 16 * SP;  // one row's staging (padding rows included)
  auto stage = [&](int buf, int ri) { return stage_base + (buf * R + ri) * row_elems; };

  // setup: the padding rows m'..16 tiles - 1 of both buffers zero (zero K rows of the MMA;
  // the copies never write them), the sign masks, this warp's A bits
  for (int e = tid; e < 2 * R * (tiles * 16 - mq) * SP; e += nthreads) {
    const int per = (tiles * 16 - mq) * SP, slot = e / per;
    stage(slot / R, slot % R)[mq * SP + e % per] = 0;
  }
  for (int c = tid; c < chunks; c += nthreads) {
    uint32_t w = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (a.signs[8 * c + k] < 0.f) w |= sign_bits_at(0, k / 2, k & 1);
    }
    pmask[c] = w;
  }
  const int ri = warp / wpr, wt = warp % wpr;  // this warp's row and its m-tiles wt MT + u
  uint32_t* sb = reinterpret_cast<uint32_t*>(smem + a.l.abits) +
                 warp * MT * (kRegMaxTiles / 4) * 32;
  bool has[MT];  // m-tile u exists (the last warp of an odd count has one)
#pragma unroll
  for (int u = 0; u < MT; ++u) {
    has[u] = wt * MT + u < tiles;
    if (has[u]) reg_a_bits(a, wt * MT + u, sb + u * (kRegMaxTiles / 4) * 32);  // this warp's
  }

  const T* x = static_cast<const T*>(a.x);
  const int r0 = tid / chunks, c0 = tid % chunks;  // this thread's first (row, chunk)
  auto copy_group = [&](int64_t grp, int buf) {
    for (int r = r0, c = c0; r < R; flat_next(r, c, nthreads, chunks)) {
      const int64_t row = grp * R + r;
      if (row < a.rows) {
        cp_async16(stage(buf, r) + (8 * c / PW) * SP + (8 * c) % PW, x + row * n + 8 * c);
      }
    }
    cp_async_commit();
  };

  int buf = 0;
  int64_t grp = blockIdx.x;
  copy_group(grp, 0);
  for (; grp * R < a.rows; grp += gridDim.x, buf ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // S1: this group staged; the last group's readers of everything done
    copy_group(grp + gridDim.x, buf ^ 1);  // the next group's copy overlaps this one's work
    // the signs: flip the sign bits of the staged 16-bit values
    for (int r = r0, c = c0; r < R; flat_next(r, c, nthreads, chunks)) {
      if (grp * R + r < a.rows) {
        uint4* q = reinterpret_cast<uint4*>(stage(buf, r) + (8 * c / PW) * SP + (8 * c) % PW);
        const uint32_t w = pmask[c];
        uint4 v = *q;
        v.x ^= sign_pair(w, 0, 0);
        v.y ^= sign_pair(w, 0, 1);
        v.z ^= sign_pair(w, 0, 2);
        v.w ^= sign_pair(w, 0, 3);
        *q = v;
      }
    }
    __syncthreads();  // S2
    const int64_t row = grp * R + ri;
    const bool live = row < a.rows;
    float acc[MT][NT][4];
    float amax = 0.f;
    if (live) {
      // the small factor on the tensor cores: D (16 outputs x pw) = A (16 x m'') B (m'' x pw)
#pragma unroll
      for (int u = 0; u < MT; ++u) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[u][nt][0] = acc[u][nt][1] = acc[u][nt][2] = acc[u][nt][3] = 0.f;
        }
      }
      const uint16_t* st = stage(buf, ri);
      const int brow = ((lane >> 3) & 1) * 8 + (lane & 7), bcol = (lane >> 4) * 8;
#pragma unroll
      for (int kw = 0; kw < kRegMaxTiles / 4; ++kw) {
        if (4 * kw >= tiles) break;
        uint32_t bw[MT];
#pragma unroll
        for (int u = 0; u < MT; ++u) bw[u] = sb[(u * (kRegMaxTiles / 4) + kw) * 32 + lane];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int kt = 4 * kw + q;
          if (kt >= tiles) break;
          uint32_t af[MT][4];
#pragma unroll
          for (int u = 0; u < MT; ++u) {
#pragma unroll
            for (int r = 0; r < 4; ++r) af[u][r] = kOne ^ sign_pair(bw[u], q, r);
          }
#pragma unroll
          for (int nb = 0; nb < NT / 2; ++nb) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, st + (kt * 16 + brow) * SP + nb * 16 + bcol);
#pragma unroll
            for (int u = 0; u < MT; ++u) {
              if (has[u]) {
                mma16816<kBf16>(acc[u][2 * nb], af[u], b[0], b[1]);
                mma16816<kBf16>(acc[u][2 * nb + 1], af[u], b[2], b[3]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < MT; ++u) {
        // H_pw on the accumulators: column j = 8 nt + 2 t + e
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int h = 0; h < 4; h += 2) {
            const float x0 = acc[u][nt][h], x1 = acc[u][nt][h + 1];
            acc[u][nt][h] = x0 + x1;
            acc[u][nt][h + 1] = x0 - x1;
          }
        }
#pragma unroll
        for (int hh = 1; hh < NT; hh *= 2) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if ((nt & hh) == 0) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const float x0 = acc[u][nt][e], x1 = acc[u][nt + hh][e];
                acc[u][nt][e] = x0 + x1;
                acc[u][nt + hh][e] = x0 - x1;
              }
            }
          }
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh *= 2) {
          const float sgn = (lane & sh) ? -1.f : 1.f;  // lower lane: u + v; upper: u - v
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float o = __shfl_xor_sync(0xFFFFFFFFu, acc[u][nt][e], sh);
              acc[u][nt][e] = fmaf(sgn, acc[u][nt][e], o);
            }
          }
        }
        const int o0 = (wt * MT + u) * 16 + g;  // rows o0 and o0 + 8 (outputs >= m' unused)
        const bool v0 = o0 < mq, v1 = o0 + 8 < mq;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (v0) amax = fmaxf(amax, fmaxf(fabsf(acc[u][nt][0]), fabsf(acc[u][nt][1])));
          if (v1) amax = fmaxf(amax, fmaxf(fabsf(acc[u][nt][2]), fabsf(acc[u][nt][3])));
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
      if (lane == 0) red[warp] = amax;
    }
    __syncthreads();  // S3: every warp's maximum
    if (live) {
      amax = red[ri * wpr];
      for (int k = 1; k < wpr; ++k) amax = fmaxf(amax, red[ri * wpr + k]);
      // the scale (cbq_kernels.quant_math.act_step) and the codes
      const float s = act_step(amax, a.inv_sqrt_n, a.ratio, a.qmax);
      const float inv_s = __fdiv_rn(1.0f, s);
      if (wt == 0 && lane == 0) a.scales[row] = s;
      unsigned char* cb = cbuf + ri * mq * cpitch;
#pragma unroll
      for (int u = 0; u < MT; ++u) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int o = (wt * MT + u) * 16 + g + half * 8;
          if (o < mq) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              uint32_t c[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {  // low bits: the code (int4: offset 8 folded in)
                c[e] = code_bits<BITS>(acc[u][nt][2 * half + e], a.inv_sqrt_n, inv_s, a.qmax);
              }
              if constexpr (BITS == 8) {
                *reinterpret_cast<uint16_t*>(cb + o * cpitch + 8 * nt + 2 * t) =
                    static_cast<uint16_t>(__byte_perm(c[0], c[1], 0x0040));
              } else {
                cb[o * cpitch + 4 * nt + t] =
                    static_cast<unsigned char>((c[0] & 0xFu) | ((c[1] & 0xFu) << 4));
              }
            }
          }
        }
      }
    }
    __syncthreads();  // S4: the group's codes in the code buffer
    // whole 16-byte chunks to global memory: a row's codes are n (int8) or n / 2 bytes
    {
      constexpr int seg = BITS == 8 ? PW : PW / 2;
      const int row_bytes = BITS == 8 ? n : n / 2, pieces = row_bytes / 16;
      for (int r = tid / pieces, c = tid % pieces; r < R; flat_next(r, c, nthreads, pieces)) {
        const int64_t orow = grp * R + r;
        if (orow < a.rows) {
          const uint4 v = *reinterpret_cast<const uint4*>(cbuf + r * mq * cpitch +
                                                          (16 * c / seg) * cpitch + (16 * c) % seg);
          reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(a.codes) +
                                   orow * row_bytes)[c] = v;
        }
      }
    }
  }
  cp_async_wait_all();
}

template <typename T, int NT, int BITS, int MT>
void reg_launch(const RegArgs& a, int threads, size_t smem, int device, int sms,
                cudaStream_t stream) {
  const auto kernel = hadamard_quant_reg_kernel<T, NT, BITS, MT>;
  static std::atomic<int> allowed[kMaxDevices] = {};  // this instantiation's, per device
  allow_smem(kernel, smem, device, allowed);
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
        "occupancy");
  const int64_t groups = (a.rows + a.R - 1) / a.R;
  const int64_t most = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int blocks = static_cast<int>(groups < most ? groups : most);
  kernel<<<blocks, threads, smem, stream>>>(a);
}

template <typename T, int BITS>
void reg_dispatch(const RegArgs& a, int pw, int mt, int threads, size_t smem, int device,
                  int sms, cudaStream_t s) {
  if (mt == 2) {  // pw <= 64 (reg_shape)
    if (pw == 32) reg_launch<T, 4, BITS, 2>(a, threads, smem, device, sms, s);
    else reg_launch<T, 8, BITS, 2>(a, threads, smem, device, sms, s);
    return;
  }
  switch (pw) {
    case 32: reg_launch<T, 4, BITS, 1>(a, threads, smem, device, sms, s); break;
    case 64: reg_launch<T, 8, BITS, 1>(a, threads, smem, device, sms, s); break;
    default: reg_launch<T, 16, BITS, 1>(a, threads, smem, device, sms, s); break;
  }
}

}  // namespace

// variant 1: this kernel, one m-tile per warp; 3: two m-tiles per warp (pw <= 64); 2: the
// exchange kernel (hadamard_quant_xch.cu: p = 1024 with m <= 32, p = 2048 with m <= 16);
// 0: 2 where it takes the shape, else 3 where it does (more than one m-tile), else 1. Why:
// variant 1 reads the whole staged row once per m-tile (~800 KB of ldmatrix per 28672 row,
// ~6300 shared-memory cycles per row per SM against ~6700 for 80% of the copy bandwidth;
// 11008: ~2630 of ~2650), the exchange kernel ~400 KB, two m-tiles per warp half the reads.
static int reg_variant(int64_t n, int64_t m, int64_t p, int bits, int in_dtype, int variant) {
  if (variant == 0) {
    if (hadamard_quant_xch_smem_bytes(n, m, p, bits, in_dtype) >= 0) return 2;
    const RegShape two = reg_shape(m, p, 2);
    return two.tiles > 1 ? 3 : 1;
  }
  return variant;
}

int64_t hadamard_quant_reg_smem_bytes(int64_t n, int64_t m, int64_t p, int bits, int in_dtype,
                                      int variant) {
  if (in_dtype == static_cast<int>(DType::kFloat32) || m < 1 || p < 1 || n != m * p) return -1;
  if (variant < 0 || variant > 3) return -1;
  const int v = reg_variant(n, m, p, bits, in_dtype, variant);
  if (v == 2) return hadamard_quant_xch_smem_bytes(n, m, p, bits, in_dtype);
  const RegShape s = reg_shape(m, p, v == 3 ? 2 : 1);
  if (s.tiles == 0) return -1;
  return reg_layout(n, s, bits).total;
}

void hadamard_quant_reg_cuda(const void* x, const float* signs, const float* small,
                             int32_t* codes, float* scales, int64_t rows, int64_t n, int64_t m,
                             int64_t mp, int64_t p, int bits, int in_dtype, int variant,
                             float ratio, float inv_sqrt_n, int device, std::uintptr_t stream) {
  const int64_t smem = hadamard_quant_reg_smem_bytes(n, m, p, bits, in_dtype, variant);
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  int sms = 0, smem_max = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
            "shared memory limit");
  if (smem < 0 || smem > smem_max) {
    if (previous != device) cudaSetDevice(previous);
    throw std::invalid_argument(
        "cbq_kernels._C: hadamard_quant_reg_cuda: width " + std::to_string(n) + " = " +
        std::to_string(m) + " x " + std::to_string(p) +
        (smem < 0 ? " is not taken by variant " + std::to_string(variant) +
                        " (16-bit inputs; 1: p >= 32, m p / min(p, 128) <= 256; 3: the same "
                        "with p <= 64; 2: p = 1024 with m <= 32 or p = 2048 with m <= 16)"
                  : " needs " + std::to_string(smem) + " bytes of shared memory, the device has " +
                        std::to_string(smem_max)));
  }
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (reg_variant(n, m, p, bits, in_dtype, variant) == 2) {
    hadamard_quant_xch_launch(x, signs, small, codes, scales, rows, n, m, mp, p, bits, in_dtype,
                              ratio, inv_sqrt_n, device, sms, st);
    const cudaError_t err = cudaGetLastError();
    if (previous != device) cudaSetDevice(previous);
    check(err, "hadamard_quant_xch launch");
    return;
  }
  const RegShape s = reg_shape(m, p, reg_variant(n, m, p, bits, in_dtype, variant) == 3 ? 2 : 1);
  RegArgs a{};
  static_cast<HqCommon&>(a) =
      hq_common(x, signs, small, codes, scales, rows, n, m, mp, p, bits, ratio, inv_sqrt_n);
  a.f = s.f;
  a.mq = s.mq;
  a.tiles = s.tiles;
  a.wpr = s.wpr;
  a.R = s.rows_per_block;
  a.l = reg_layout(n, s, bits);
  const int threads = 32 * s.warps;
  if (rows > 0) {
    if (in_dtype == static_cast<int>(DType::kBFloat16)) {
      if (bits == 8) reg_dispatch<__nv_bfloat16, 8>(a, s.pw, s.mt, threads, smem, device, sms, st);
      else reg_dispatch<__nv_bfloat16, 4>(a, s.pw, s.mt, threads, smem, device, sms, st);
    } else {
      if (bits == 8) reg_dispatch<__half, 8>(a, s.pw, s.mt, threads, smem, device, sms, st);
      else reg_dispatch<__half, 4>(a, s.pw, s.mt, threads, smem, device, sms, st);
    }
  }
  const cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check(err, "hadamard_quant_reg launch");
}

}  // namespace cbq
