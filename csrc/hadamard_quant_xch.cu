// Online Hadamard rotation fused with per-token activation quantization, exchange version:
// the register kernel's structure (csrc/hadamard_quant_reg.cu) for p = 1024 and 2048, where
// that kernel grows the tensor-core factor to m' = m p / 128 (224 at 28672 = 28 x 1024: ~3100
// MMAs and ~800 KB of ldmatrix reads per row, ~6300 shared-memory cycles per row per SM
// against ~6700 for 80% of the copy bandwidth). Here the tensor cores do H_m alone and
// H_p = H_f (x) H_128 splits across warps:
//  - warp (b, tile) of a row: the 16 output segments `tile` of H_m applied to the input
//    segments i f + b (the b-th 128-column block of every small-factor segment): K = m padded
//    to 16 (rows i >= m read a zero chunk), x from the staging buffer by ldmatrix.trans, the
//    signs applied to those fragments in registers (a lane's sign bits for its fragments are
//    the same in every row: 4 words), then H_128 on the accumulators as in the register
//    kernel;
//  - a warp does the two 64-column halves of its block one after the other (H_64 on 32
//    accumulators; all 128 columns at once spilled at the 128-register cap of 16 warps), and
//    the accumulators go to an fp32 buffer W[b][o][j] (16-byte chunks swizzled by o: the
//    fragment-layout stores of 8 rows land in distinct banks); after a barrier each thread
//    takes PJ consecutive columns of one output segment o in both halves of all f blocks b
//    (2 x 8 x 4 values at f = 8, 2 x 16 x 2 at f = 16), applies H_2 (the halves) and H_f to
//    them in registers, takes the row maximum and writes its codes directly (4- or 2-byte
//    stores, 16 or 32 threads per 64 contiguous bytes);
//  - staging chunks are swizzled by i (ldmatrix reads 8 consecutive i of one chunk column),
//    rows copied one group ahead by cp.async (double-buffered: 229 KB of shared memory at
//    28672, of the 227 KB a block may have).
// Shared-memory traffic per 28672 row: ldmatrix ~115 KB, W ~230 KB, staging ~57 KB, against
// ~800 KB of ldmatrix alone in the register kernel; MMAs 448 against ~3100. Instructions per
// element about as many (the butterflies and the quantizer dominate both).
// Registers: the exchange holds its 64 values across the row-maximum barrier; at the
// 128-register cap of 16 warps ptxas keeps 10-13 of them and 2-3 loop values in local memory
// (52-60 bytes per thread, one store and one load per row each: cuobjdump -sass, sm_90a),
// ~53 KB of L1 traffic per 28672 row against ~400 KB of shared memory (writing the values
// back to W instead would move 512 bytes per thread).
// Contract and exactness: as the register kernel's (cbq_kernels/hadamard_quant.py).
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

namespace cbq {
namespace {

using namespace hreg;

constexpr int kXchMaxWarps = 16;
constexpr int kPw = 128;  // columns per block of the power-of-two factor (NT = 16 n-tiles)

struct XchShape {
  int f, tiles, wr, rows_per_block, warps, pj;
};

// f = p / 128 (8 or 16), tiles = ceil(m / 16), wr = tiles f warps per row (<= 16), R rows per
// block, PJ columns per half per thread in the exchange (2 PJ f = 64 values in registers);
// not taken: tiles = 0
XchShape xch_shape(int64_t m, int64_t p) {
  XchShape s{};
  const bool ok = (p == 1024 && m >= 1 && m <= 32) || (p == 2048 && m >= 1 && m <= 16);
  if (!ok) return s;
  s.f = static_cast<int>(p / kPw);
  s.tiles = static_cast<int>((m + 15) / 16);
  s.wr = s.tiles * s.f;
  s.rows_per_block = kXchMaxWarps / s.wr;
  s.warps = s.rows_per_block * s.wr;
  s.pj = 32 / s.f;
  return s;
}

struct XchLayout {
  int64_t stage, w, zero, red, total;
};

XchLayout xch_layout(int64_t m, const XchShape& s) {
  XchLayout l{};
  const int64_t seg_rows = m * s.f;  // 128-column segments per row
  l.stage = 0;
  l.w = l.stage + 2LL * s.rows_per_block * seg_rows * kPw * 2;
  l.zero = l.w + static_cast<int64_t>(s.rows_per_block) * seg_rows * kPw * 4;
  l.red = l.zero + 16;
  l.total = l.red + 4LL * s.warps;
  return l;
}

struct XchArgs : HqCommon {
  int tiles, wr, R;
  XchLayout l;
};

template <typename T, int F, int BITS>
__global__ void __launch_bounds__(kXchMaxWarps * 32, 1) hadamard_quant_xch_kernel(XchArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int PJ = 32 / F;        // columns per half per thread in the exchange
  constexpr int LF = F == 8 ? 3 : 4;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr uint32_t kOne = kBf16 ? 0x3F803F80u : 0x3C003C00u;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int m = a.m, p = a.p, n = a.n, R = a.R, tiles = a.tiles, wr_n = a.wr;
  const int chunks = n / 8;  // 16-byte pieces of a row
  const int seg_rows = m * F;
  uint16_t* stage_base = reinterpret_cast<uint16_t*>(smem + a.l.stage);
  float* wbuf = reinterpret_cast<float*>(smem + a.l.w);
  const uint16_t* zero = reinterpret_cast<const uint16_t*>(smem + a.l.zero);
  float* red = reinterpret_cast<float*>(smem + a.l.red);
  auto stage = [&](int buf, int ri) { return stage_base + (buf * R + ri) * seg_rows * kPw; };
  // staging element (segment r = i F + b, column c): 16-byte chunks swizzled by i
  auto staged = [&](int r, int c) { return r * kPw + ((((c >> 3) ^ ((r >> LF) & 7))) << 3); };

  const int ri = warp / wr_n, wr = warp % wr_n, b = wr / tiles, tile = wr % tiles;
  if (tid < 4) reinterpret_cast<uint32_t*>(smem + a.l.zero)[tid] = 0;
  // this lane's A sign bits (H_m^T, one word: k-tile q = kt <= 1) and B sign bits (the signs of
  // the x elements in its fragments: (kt, nb) pair q = kt 8 + nb, four per word)
  uint32_t abits = 0, bsign[4];
  for (int kt = 0; kt < tiles; ++kt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int o = tile * 16 + g + (r & 1) * 8;
      const int k = kt * 16 + 2 * t + (r >> 1) * 8;
      if (o < m && k < m && a.small[k * a.mp + o] < 0.f) abits |= sign_bits_at(kt, r, 0);
      if (o < m && k + 1 < m && a.small[(k + 1) * a.mp + o] < 0.f) {
        abits |= sign_bits_at(kt, r, 1);
      }
    }
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {  // pairs q = 4 w .. 4 w + 3: constant indices, registers
    uint32_t word = 0;
#pragma unroll 1
    for (int qq = 0; qq < 4; ++qq) {  // not unrolled: 128 hoisted loads spilled (ptxas)
      const int kt = (4 * w + qq) / 8, nb = (4 * w + qq) % 8;
      if (kt >= tiles) continue;
#pragma unroll 1
      for (int r = 0; r < 4; ++r) {
        const int j = 16 * nb + (r >> 1) * 8 + g;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = kt * 16 + (r & 1) * 8 + 2 * t + e;
          if (k < m && a.signs[(k * F + b) * kPw + j] < 0.f) word |= sign_bits_at(qq, r, e);
        }
      }
    }
    bsign[w] = word;
  }

  const T* x = static_cast<const T*>(a.x);
  auto copy_group = [&](int64_t grp, int buf) {  // R <= 2 rows of >= 1536 chunks: row-major
    for (int r = 0; r < R; ++r) {
      const int64_t row = grp * R + r;
      if (row >= a.rows) break;
      for (int c = tid; c < chunks; c += blockDim.x) {
        cp_async16(stage(buf, r) + staged(8 * c / kPw, (8 * c) % kPw), x + row * n + 8 * c);
      }
    }
    cp_async_commit();
  };
  const int units = m * (64 / PJ);  // exchange units of a row: (segment o, PJ columns)
  const int tr = tid - ri * wr_n * 32;  // this thread's index among its row's
  int buf = 0;
  int64_t grp = blockIdx.x;
  copy_group(grp, 0);
  for (; grp * R < a.rows; grp += gridDim.x, buf ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // S1: this group staged; the previous group's readers of W done
    copy_group(grp + gridDim.x, buf ^ 1);
    const int64_t row = grp * R + ri;
    const bool live = row < a.rows;
    float* wrow = wbuf + static_cast<int64_t>(ri) * seg_rows * kPw;  // W[b][o][j] of this row
    if (live) {
      const uint16_t* st = stage(buf, ri);
      const int kl = ((lane >> 3) & 1) * 8 + (lane & 7);  // this lane's ldmatrix row in a tile
      // two halves of the 128 columns, one after the other (32 accumulators: with all 64 the
      // kernel spilled 336 bytes at the 128-register cap of 16 warps; ptxas, sm_90a); H_64 here,
      // the halves' H_2 in the exchange with H_F
#pragma unroll 1
      for (int hc = 0; hc < 2; ++hc) {
        float acc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll 1
        for (int kt = 0; kt < tiles; ++kt) {
          uint32_t af[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) af[r] = kOne ^ sign_pair(abits, kt, r);
          // pairs q = 8 kt + 4 hc + nb: word 2 kt + hc, position nb (constant indices)
          const uint32_t sg = kt ? (hc ? bsign[3] : bsign[2]) : (hc ? bsign[1] : bsign[0]);
          const int k = kt * 16 + kl;
#pragma unroll
          for (int nb = 0; nb < 4; ++nb) {  // n-tile pairs 4 hc + nb of the 128 columns
            const int c = (4 * hc + nb) * 16 + (lane >> 4) * 8;
            const uint16_t* src = k < m ? st + staged(k * F + b, c) : zero;
            uint32_t bf[4];
            ldmatrix_x4_trans(bf, src);
#pragma unroll
            for (int r = 0; r < 4; ++r) bf[r] ^= sign_pair(sg, nb, r);
            mma16816<kBf16>(acc[2 * nb], af, bf[0], bf[1]);
            mma16816<kBf16>(acc[2 * nb + 1], af, bf[2], bf[3]);
          }
        }
        // H_64 on the accumulators: column 64 hc + 8 nt + 2 t + e
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int h = 0; h < 4; h += 2) {
            const float u = acc[nt][h], v = acc[nt][h + 1];
            acc[nt][h] = u + v;
            acc[nt][h + 1] = u - v;
          }
        }
#pragma unroll
        for (int hh = 1; hh < 8; hh *= 2) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            if ((nt & hh) == 0) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const float u = acc[nt][e], v = acc[nt + hh][e];
                acc[nt][e] = u + v;
                acc[nt + hh][e] = u - v;
              }
            }
          }
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh *= 2) {
          const float sgn = (lane & sh) ? -1.f : 1.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float o = __shfl_xor_sync(0xFFFFFFFFu, acc[nt][e], sh);
              acc[nt][e] = fmaf(sgn, acc[nt][e], o);
            }
          }
        }
        // to W[b][o][j]: chunk j / 4 of row (b, o) at chunk (j / 4) ^ 2 (o & 3)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int o = tile * 16 + g + 8 * half;
          if (o < m) {
            float* wr_row = wrow + (b * m + o) * kPw;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              const int chunk = (16 * hc + 2 * nt + (t >> 1)) ^ ((o & 3) << 1);
              *reinterpret_cast<float2*>(wr_row + chunk * 4 + (t & 1) * 2) =
                  make_float2(acc[nt][2 * half], acc[nt][2 * half + 1]);
            }
          }
        }
      }
    }
    __syncthreads();  // S2: the row's blocks b in W
    // the exchange: unit (o, PJ columns jq PJ .. of the first 64) of this thread, both halves
    // hc and every block b; then H_2 over hc and H_F over b
    float v[2][F][PJ];
    float amax = 0.f;
    const bool mine = live && tr < units;
    const int uo = mine ? tr / (64 / PJ) : 0, uj = mine ? (tr % (64 / PJ)) * PJ : 0;
    if (mine) {
#pragma unroll
      for (int hc = 0; hc < 2; ++hc) {
#pragma unroll
        for (int bb = 0; bb < F; ++bb) {
          const int j = 64 * hc + uj;
          const float* src = wrow + (bb * m + uo) * kPw + ((j / 4) ^ ((uo & 3) << 1)) * 4 + j % 4;
          if constexpr (PJ == 4) {
            const float4 w4 = *reinterpret_cast<const float4*>(src);
            v[hc][bb][0] = w4.x;
            v[hc][bb][1] = w4.y;
            v[hc][bb][2] = w4.z;
            v[hc][bb][3] = w4.w;
          } else {
            const float2 w2 = *reinterpret_cast<const float2*>(src);
            v[hc][bb][0] = w2.x;
            v[hc][bb][1] = w2.y;
          }
        }
      }
#pragma unroll
      for (int bb = 0; bb < F; ++bb) {
#pragma unroll
        for (int c = 0; c < PJ; ++c) {
          const float u = v[0][bb][c], w = v[1][bb][c];
          v[0][bb][c] = u + w;
          v[1][bb][c] = u - w;
        }
      }
#pragma unroll
      for (int hh = 1; hh < F; hh *= 2) {
#pragma unroll
        for (int hc = 0; hc < 2; ++hc) {
#pragma unroll
          for (int bb = 0; bb < F; ++bb) {
            if ((bb & hh) == 0) {
#pragma unroll
              for (int c = 0; c < PJ; ++c) {
                const float u = v[hc][bb][c], w = v[hc][bb + hh][c];
                v[hc][bb][c] = u + w;
                v[hc][bb + hh][c] = u - w;
              }
            }
          }
        }
      }
#pragma unroll
      for (int hc = 0; hc < 2; ++hc) {
#pragma unroll
        for (int bb = 0; bb < F; ++bb) {
#pragma unroll
          for (int c = 0; c < PJ; ++c) amax = fmaxf(amax, fabsf(v[hc][bb][c]));
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    if (lane == 0) red[warp] = amax;
    __syncthreads();  // S3: every warp's maximum
    if (live) {
      amax = red[ri * wr_n];
      for (int k = 1; k < wr_n; ++k) amax = fmaxf(amax, red[ri * wr_n + k]);
      const float s = act_step(amax, a.inv_sqrt_n, a.ratio, a.qmax);
      const float inv_s = __fdiv_rn(1.0f, s);
      if (tr == 0) a.scales[row] = s;
      if (mine) {
        // the thread's first code (segment uo, block 0, column uj): the others at constant
        // offsets (block bb: 128 bb elements, half hc: 64 hc), so no address is kept per store
        const int64_t first = row * n + static_cast<int64_t>(uo) * p + uj;
        unsigned char* out = reinterpret_cast<unsigned char*>(a.codes) +
                             (BITS == 8 ? first : first / 2);
#pragma unroll
        for (int hc = 0; hc < 2; ++hc) {
#pragma unroll
          for (int bb = 0; bb < F; ++bb) {
            uint32_t c[PJ];
#pragma unroll
            for (int e = 0; e < PJ; ++e) {
              c[e] = code_bits<BITS>(v[hc][bb][e], a.inv_sqrt_n, inv_s, a.qmax);
            }
            const int off = bb * kPw + 64 * hc;  // elements after the first (constants)
            if constexpr (BITS == 8) {
              const uint32_t lo = __byte_perm(c[0], c[1], 0x0040);
              if constexpr (PJ == 4) {
                *reinterpret_cast<uint32_t*>(out + off) =
                    __byte_perm(lo, __byte_perm(c[2], c[3], 0x0040), 0x5410);
              } else {
                *reinterpret_cast<uint16_t*>(out + off) = static_cast<uint16_t>(lo);
              }
            } else {
              uint32_t word = 0;
#pragma unroll
              for (int e = 0; e < PJ; ++e) word |= (c[e] & 0xFu) << (4 * e);
              if constexpr (PJ == 4) {
                *reinterpret_cast<uint16_t*>(out + off / 2) = static_cast<uint16_t>(word);
              } else {
                out[off / 2] = static_cast<unsigned char>(word);
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait_all();
}

template <typename T, int F, int BITS>
void xch_run(const XchArgs& a, int threads, size_t smem, int device, int sms,
             cudaStream_t stream) {
  const auto kernel = hadamard_quant_xch_kernel<T, F, BITS>;
  static std::atomic<int> allowed[kMaxDevices] = {};  // this instantiation's, per device
  allow_smem(kernel, smem, device, allowed);
  const int64_t groups = (a.rows + a.R - 1) / a.R;
  const int blocks = static_cast<int>(groups < sms ? groups : sms);  // one block per SM
  kernel<<<blocks, threads, smem, stream>>>(a);
}

template <typename T, int BITS>
void xch_dispatch(const XchArgs& a, int f, int threads, size_t smem, int device, int sms,
                  cudaStream_t s) {
  if (f == 8) xch_run<T, 8, BITS>(a, threads, smem, device, sms, s);
  else xch_run<T, 16, BITS>(a, threads, smem, device, sms, s);
}

}  // namespace

int64_t hadamard_quant_xch_smem_bytes(int64_t n, int64_t m, int64_t p, int bits, int in_dtype) {
  (void)bits;  // the codes go straight to global memory: no code buffer
  if (in_dtype == static_cast<int>(DType::kFloat32) || n != m * p) return -1;
  const XchShape s = xch_shape(m, p);
  if (s.tiles == 0) return -1;
  return xch_layout(m, s).total;
}

void hadamard_quant_xch_launch(const void* x, const float* signs, const float* small,
                               int32_t* codes, float* scales, int64_t rows, int64_t n, int64_t m,
                               int64_t mp, int64_t p, int bits, int in_dtype, float ratio,
                               float inv_sqrt_n, int device, int sms, cudaStream_t stream) {
  const XchShape s = xch_shape(m, p);
  const int64_t smem = hadamard_quant_xch_smem_bytes(n, m, p, bits, in_dtype);
  if (smem < 0) {
    throw std::invalid_argument("cbq_kernels._C: hadamard_quant_xch: width " +
                                std::to_string(n) + " = " + std::to_string(m) + " x " +
                                std::to_string(p) +
                                " is not taken (p = 1024 with m <= 32, p = 2048 with m <= 16, "
                                "16-bit inputs)");
  }
  XchArgs a{};
  static_cast<HqCommon&>(a) =
      hq_common(x, signs, small, codes, scales, rows, n, m, mp, p, bits, ratio, inv_sqrt_n);
  a.tiles = s.tiles;
  a.wr = s.wr;
  a.R = s.rows_per_block;
  a.l = xch_layout(m, s);
  const int threads = 32 * s.warps;
  if (rows <= 0) return;
  if (in_dtype == static_cast<int>(DType::kBFloat16)) {
    if (bits == 8) xch_dispatch<__nv_bfloat16, 8>(a, s.f, threads, smem, device, sms, stream);
    else xch_dispatch<__nv_bfloat16, 4>(a, s.f, threads, smem, device, sms, stream);
  } else {
    if (bits == 8) xch_dispatch<__half, 8>(a, s.f, threads, smem, device, sms, stream);
    else xch_dispatch<__half, 4>(a, s.f, threads, smem, device, sms, stream);
  }
}

}  // namespace cbq
