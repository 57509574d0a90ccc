// Decode GEMM (M <= 16) on tensor cores for 4-bit and 2-bit weights: W4A16 / W2A16 with bf16 or
// fp16 activations (mma.m16n8k16, fp32 accumulation), and W4A8 / W4A4 with integer activation
// codes (mma.m16n8k32 s8 x s8 -> s32: exact).
//
// Why this kernel, and why it looks the way it does (measured on the H200, issue 13): a first
// version (bf16 MMA for every mode, zero points subtracted and group scales multiplied on the
// weight fragments, a division per k-step, per-element predicated activation loads) ran
// 1 x 28672 x 8192 W4A16 g128 in 78 us, 27% of DRAM bandwidth: Nsight Compute showed 2.3
// instructions issued per clock per SM, 55% of the issue slots busy and the ALU pipe the
// busiest: about 180 warp instructions per 16 x 64 weight tile where ~80 were expected. This
// version removes the work per weight code that is not the conversion itself:
//  - the weight is reordered offline (cbq_kernels/gemm_decode.py, prepare_decode) so that one
//    lane's two 16-byte loads per chunk hold its B fragments for all 8 output subtiles, and the
//    K order inside a chunk is permuted the same way for activations and weights so that a
//    lane's activation fragment is one contiguous 16-byte (bf16) / 8-byte (int8) / 4-byte
//    (int4) load per row instead of four predicated 4-byte loads;
//  - float modes: a shift and one LOP3 make a pair of bf16 values 128 + q ((w >> s) & 0x000F000F
//    | 0x43004300: a bf16 with exponent 2^7 has a unit in the last place of 1); the MMA runs on
//    (128 + q) directly and the zero point and offset leave through the row sums of x (one
//    extra MMA per k-step against a B of ones): sum_k x (q - z) s = s (sum_k x (128 + q)
//    - (128 + z) sum_k x), applied per group (or per 128 K for per-channel scales, which keeps
//    the fp32 sums small: relative error ~ 2^-24 x 300 for a 128-long group);
//  - integer modes: the weight codes are unsigned bytes after one AND ((w >> 4) & 0x0F0F0F0F:
//    4 codes per instruction), the MMA is s8 x s8 -> s32 (exact), and z sum_k x is subtracted
//    per group in int32: the debug output x_codes @ (q - z)^T is exact for any K;
//  - a group change is one compare per chunk (no division);
//  - (v6) the weights go global -> shared memory by cp.async into a per-warp ring of kDepth = 8
//    chunks (each lane copies, and later reads, its own 32 bytes per chunk: no barrier), so the
//    bytes in flight cost no registers (v4 held a 4-chunk ring in 32 registers);
//  - (v7) M <= 8 swaps the MMA operands: y^T = W x^T with the weights as the 16-row A operand
//    and x as the 8-column B operand, so no MMA row is padding (with x as A, 15 of 16 rows are
//    padding at M = 1): 10 MMAs per chunk instead of 18, 16 accumulators instead of 32, one
//    activation load per lane, B = two consecutive registers of that load (v4 spent ~20
//    register moves per chunk assembling A from two loads); <= 105 registers: 4 blocks per SM;
//  - (v8) the activation addresses are per-lane pointers plus one add per chunk.
//  H200, M = 1, best split (benchmarks/results/h200/sweep_decode_variants_1da67a5.txt):
//  1 x 28672 x 8192 W4A16 g128 70.9 -> 48.1 us (2.44 TB/s), W4A8 52.5 -> 41.6, W2A16 g128
//  57.6 -> 39.8; 1 x 4096 x 11008 W4A16 16.7 -> 14.4.
//
// Layout (prepare_decode documents the same in Python; its emulator test checks it against the
// PTX fragment layouts). Chunk = CK values of K: CK = 32 for 4-bit containers, 64 for 2-bit;
// n-tile = 64 output channels = 8 subtiles of 8. words: int32 [N_pad / 64][K_pad / CK][2][32
// lanes][4 words] (two fully coalesced 512-byte warp loads per chunk); lane l = 4 g + t, word
// s = 4 h + j = subtile s, column n = n0 + 8 s + g. Word s holds the
// CK / 4 codes of column n at K positions kc + (CK / 4) t + i, i < CK / 4: code i = 2 j + e at
// bits BITS j + 16 e (j < 16 / BITS, e = 0 / 1): pair j of the word is the bf16 pair
// (k = .. + 2j, .. + 2j + 1), exactly the pair of activations the lane loaded as its j-th
// 32-bit register.
//   scales: fp32 [G][N_pad]; zeros: int32 [G][N_pad] (padding: scale 0, zero 0, codes 0).
//
// Work split: block = 4 warps on one n-tile and all M rows (up to two 16-row m-tiles); grid
// (N_pad / 64, S). Split s of S owns a range of chunks, cut in 4 contiguous warp ranges. Warps
// reduce through shared memory in a fixed order; with S > 1 each block writes its partial sums
// to a workspace (S, decode_ws_rows(M), N_pad) and the last block of the n-tile (an atomic
// counter, reset by that block) adds the S partials in order 0..S-1: one launch,
// deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/ops.h"
#include "cbq/ptx.cuh"

namespace cbq {
namespace {

constexpr int kWarps = 4;
constexpr int kTN = 64;           // output channels per block
constexpr int kSub = 8;           // 8-column MMA subtiles per block
#ifndef CBQ_DEC_DEPTH
#define CBQ_DEC_DEPTH 8
#endif
// Blocks per SM the one-m-tile instances with 16-bit activations (W4A16 / W2A16) are bounded
// to; see min_blocks. 3 until session 14 (their unswapped M = 9..16 instances used 136-148
// registers); 4 squeezes them into <= 128 (ptxas -v, nvcc 13.0, sm_90a: 125-128 registers, no
// spills but for W2A16 g128, 12 bytes stored / 96 loaded). scripts/gpu_lease.sh `blk` times
// both on one GPU.
#ifndef CBQ_DEC_BLOCKS
#define CBQ_DEC_BLOCKS 4
#endif
// The split-K epilogue (S > 1: the warp reduction into the workspace and the last block's
// reduction of the S partials): 0 one column per thread and loop pass, the S partials of a
// column read one after the other; 1 four columns per thread (16-byte shared-memory and
// workspace accesses) and the partials read eight at a time before they are added, in the same
// order (bitwise the same output). S = 1 always takes the one-column path (consecutive threads
// write consecutive outputs; there is no workspace traffic to vectorise). Why 1: at M = 32
// the launch has ~15 us that does not scale with K (DECISIONS, "At M = 32 the decode
// launch..."), and with 0 more K splits made M = 16 / 32 slower, not faster. Measured on an
// H100 at 2483d26 (benchmarks/results/h100/sweep_decode_epi_2483d26/): 7b_qkvo W4A8 M = 16
// best 13.0 us (S = 2) with 0, 10.5 (S = 6) with 1; M = 32 16.9 (S = 1) -> 13.4 (S = 4);
// 70b gate/up W4A16 g128 M = 16 104.5 -> 100.3; the decode GPU tests pass with 1 (188).
#ifndef CBQ_DEC_EPI
#define CBQ_DEC_EPI 1
#endif
// Activation chunks loaded ahead into a per-lane register ring by the swapped instances (M <=
// 8): CBQ_DEC_XPF for integer activations (W4A8 / W4A4), CBQ_DEC_XPF_FLOAT for bf16 / fp16
// (0: each chunk's x loaded where it is used). Why: Nsight Compute's warp-stall samples per
// SASS instruction at 1 x 28672 x 8192 (H100, 0851fdf; benchmarks/results/h100/
// ncu_decode_sass_0851fdf.txt): the instructions waiting most are the first consumers of each
// chunk's x load (the row-sum HMMA for W4A16, the PRMT / SHF of the integer fragments), on the
// long scoreboard: 47% of all samples for W4A16 g128, 62% W4A8, 58% W4A4. Measured on one H100
// (benchmarks/results/h100/sweep_decode_xpf_85e81c7, main / 2 / 4 / main, best split, us):
// W4A8 70b gate/up M = 1 46.9-47.1 -> 46.1 / 45.7, M = 8 49.1 -> 47.8 / 47.5; 7b gate/up
// M = 1 12.9 -> 11.9 / 11.6, M = 8 13.6 -> 12.8 / 12.6; 70b down and 7b q/k/v/o within 1%.
// bf16: W4A16 g128 within +-2% (52.6-53.0 -> 53.6 / 53.4 at 70b gate/up M = 1), W2A16 g128
// 39.9 -> 43.4 / 42.1 (its 16-register ring at 4 is 8 more registers than the 2-bit chunk's
// x, and its time is the conversions', not x's: long-scoreboard samples 22%). So 4 for the
// integer instances (<= 94 registers, ptxas -v, nvcc 13.0), 0 for the 16-bit ones. The H100
// reads at 82% of its read-only rate at M = 1 (W4A16 / W4A8 70b gate/up) before the ring,
// which may be why it gains little there (not profiled with the ring on); the H200 (68-75%)
// has not been measured with it. v5
// (053a7b8) prefetched x when the weights were still held in registers and lost (the extra
// registers cost occupancy). A power of two <= CBQ_DEC_DEPTH.
#ifndef CBQ_DEC_XPF
#define CBQ_DEC_XPF 4
#endif
#ifndef CBQ_DEC_XPF_FLOAT
#define CBQ_DEC_XPF_FLOAT 0
#endif
// chunks of weight copies in flight per warp (1 KB each, in the warp's shared-memory ring)
constexpr int kDepth = CBQ_DEC_DEPTH;
constexpr int kMinBlocks = CBQ_DEC_BLOCKS;  // blocks per SM the register budget is set for
constexpr int kFloatSegment = 4;  // 4-bit chunks between fp32 flushes (per-channel scales)
// M = 17..32: two 16-row m-tiles per block (MT = 2) share each weight chunk, its conversion and
// its B fragments, so the weight stream is read once instead of once per 16-row slice (the
// slices cost 2x the M = 16 time at M = 32: 70b gate/up W4A8 133 vs 67 us, bench_gemm.csv at
// 7a9193f). Twice the accumulators: __launch_bounds__(128, 2) (<= 255 registers).
constexpr int kMaxMTiles = 2;

enum AMode : int { kABf16 = 0, kAFp16 = 1, kAInt8 = 2, kAInt4 = 3 };
// Blocks per SM each instance's register budget is set for (__launch_bounds__): MT = 2 two;
// integer activations (W4A8 / W4A4, one s8 MMA per 32 K, fewer live registers) four, that is
// <= 128 registers: the W4A8 instance needs 126-130 depending on the rest of the kernel (130
// with the four-column epilogue, 128 without), and 130 drops it from 4 to 3 blocks per SM
// (register granularity 8: 136 x 128 threads), which took 70B gate/up W4A8 at M = 16 (448
// blocks: one wave of 4 x 132, two of 3 x 132) from 52.7 to 82.6 us on an H100
// (benchmarks/results/h100/sweep_decode_epi_2483d26); no spills at 4 (ptxas -warn-spills).
// The 16-bit-activation instances: kMinBlocks (CBQ_DEC_BLOCKS). The swapped ones (M <= 8) use
// 92-110 registers whatever the bound; the unswapped ones (M = 9..16) are the ones it moves,
// from 136-148 registers (3 blocks per SM) to <= 128 (4), the step that took W4A8 from 82.6 to
// 52.7 us above; their shared memory (50 KB per block) lets 4 blocks fit as the swapped
// kernel's does.
constexpr int min_blocks(int am, int mt) { return mt == 2 ? 2 : am >= kAInt8 ? 4 : kMinBlocks; }

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cbq_kernels._C: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// (a & mask) | magic in one LOP3 (written out: with two immediates the compiler emitted an
// AND and an OR per pair, measured in the SASS of 6f6a61d)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
  return d;
}

// 16-byte asynchronous copy global -> shared (the group scales: no synchronous global load in
// the K loop)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

struct Args {
  const void* x;          // (M, K) bf16 / fp16 / int8, or (M, ceil(K / 8)) int32 (int4)
  const float* x_scales;  // (M,) integer modes
  const uint4* words;     // the layout above
  const float* scales;    // (G, N_pad)
  const int32_t* zeros;   // (G, N_pad)
  const float* bias;      // (N,) or null
  void* out;              // (M, N) out_dtype, or int32 (debug)
  uint32_t* ws;           // (S, 16, N_pad) 32-bit partial sums (S > 1)
  int32_t* counters;      // (N_pad / 64,) zero on entry, left zero
  int m, n, k, n_pad, chunks, seg_chunks, splits;
  int64_t ldx;     // row stride of x in elements (int4: in int32 words)
  int out_dtype;   // DType
  bool vec_x;      // x rows allow the vector loads (alignment, stride)
  bool pdl;        // launched with programmatic dependent launch (sm_90+, host side only)
};

// x is loaded with ld.global.ca, not through the non-coherent path (__ldg, ld.global.nc): the
// kernel in front of a decode GEMM launched with PDL writes x while the GEMM runs its prologue,
// and ptxas treats .nc loads as invariant for the whole kernel, free to move above
// griddepcontrol.wait (ACQBULK in the SASS). It did so with the activation register ring
// (CBQ_DEC_XPF): two LDG.E.64.CONSTANT of the ring's first chunks sat above ACQBULK
// (cuobjdump -sass of the W4A8 swapped instance, c4e4657) and
// test_prologue_launched_with_pdl_gives_the_same_bits failed in its CUDA graph on an H100.
// .ca caches in L1 as .nc did (x is read by every block of an SM).
// A lane's activations of one chunk for the rows it feeds (g and g + 8, clamped to M - 1: rows
// >= M only produce output rows that are never stored): kRegs 32-bit registers per row, the
// contiguous K positions kc + (CK / 4) t .. + CK / 4 - 1 (bf16 / fp16: pairs; int8: bytes;
// int4: one word of 8 codes). Positions >= K read as zero (int4: code 8).
template <int AM, int CK>
struct ALoad {
  static constexpr bool kFloat = AM == kABf16 || AM == kAFp16;
  static constexpr int kPer = CK / 4;  // K positions per lane and row
  static constexpr int kRegs = kFloat ? kPer / 2 : (AM == kAInt8 ? kPer / 4 : kPer / 8);

  // the lane's first bytes of `row` (chunk 0) and the bytes per chunk: the fast loads of
  // chunk c start at lane_base + c * kChunkBytes (one 64-bit add per chunk; indexing from
  // the chunk number, as v7 did, cost ~8 instructions per chunk in its SASS)
  static constexpr int kChunkBytes = kFloat ? CK * 2 : (AM == kAInt8 ? CK : CK / 2);
  __device__ static const char* lane_base(const Args& p, int row, int t) {
    const char* x = static_cast<const char*>(p.x);
    if constexpr (kFloat) return x + (row * p.ldx + kPer * t) * 2;
    else if constexpr (AM == kAInt8) return x + row * p.ldx + kPer * t;
    else return x + (row * p.ldx + t) * 4;
  }
  __device__ static void fast_at(uint32_t* r, const char* src) {
    if constexpr (kFloat) {
#pragma unroll
      for (int v = 0; v < kRegs / 4; ++v) {
        const uint4 q = __ldca(reinterpret_cast<const uint4*>(src) + v);
        r[4 * v] = q.x;
        r[4 * v + 1] = q.y;
        r[4 * v + 2] = q.z;
        r[4 * v + 3] = q.w;
      }
    } else if constexpr (AM == kAInt8) {
      const uint2 q = __ldca(reinterpret_cast<const uint2*>(src));
      r[0] = q.x;
      r[1] = q.y;
    } else {
      r[0] = __ldca(reinterpret_cast<const uint32_t*>(src));
    }
  }

  // element by element, masked: the last chunk when K is not a multiple of CK, and x whose
  // rows are not aligned for the vector loads
  __device__ static void slow(uint32_t* r, const Args& p, int row, int c, int t) {
    const int col0 = c * CK + kPer * t;
#pragma unroll
    for (int i = 0; i < kRegs; ++i) r[i] = 0;
    if constexpr (AM == kAInt4) r[0] = 0x88888888u;  // code 8 = activation 0
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int col = col0 + i;
      if (col >= p.k) continue;
      if constexpr (kFloat) {
        const uint32_t v = __ldca(static_cast<const uint16_t*>(p.x) + row * p.ldx + col);
        r[i / 2] |= v << (16 * (i % 2));
      } else if constexpr (AM == kAInt8) {
        const uint32_t v =
            static_cast<uint8_t>(__ldca(static_cast<const int8_t*>(p.x) + row * p.ldx + col));
        r[i / 4] |= v << (8 * (i % 4));
      } else {
        const uint32_t word = __ldca(static_cast<const uint32_t*>(p.x) + row * p.ldx + col / 8);
        const uint32_t code = (word >> (4 * (col % 8))) & 0xF;
        r[0] = (r[0] & ~(0xFu << (4 * i))) | (code << (4 * i));
      }
    }
  }
};

// int4 activation codes (offset 8) of one word -> two registers of 4 signed bytes, in the order
// of the int8 path's fragments (see to_fragments)
__device__ __forceinline__ void int4_to_s8(uint32_t v, uint32_t& lo, uint32_t& hi) {
  // codes 0..15 as bytes, then (c + 0x78) ^ 0x80 = c - 8 as a signed byte (no carry: c + 0x78
  // <= 0x87)
  const uint32_t e = ((v & 0x0F0F0F0Fu) + 0x78787878u) ^ 0x80808080u;         // nibbles 0,2,4,6
  const uint32_t o = (((v >> 4) & 0x0F0F0F0Fu) + 0x78787878u) ^ 0x80808080u;  // nibbles 1,3,5,7
  // K positions 0..7 of the word -> the int8 path's (0, 4, 1, 5) and (2, 6, 3, 7) bytes
  lo = prmt(e, o, 0x6420);
  hi = prmt(e, o, 0x7531);
}

template <int AM>
__device__ __forceinline__ void int_fragments(uint32_t* a, const uint32_t* r0, const uint32_t* r1) {
  // a0 / a1 (rows g / g + 8): K slots 4t + i = positions (0, 4, 1, 5) of the lane's 8; a2 / a3:
  // slots 16 + 4t + i = positions (2, 6, 3, 7): the weight bytes (w & 0x0F0F0F0F) and
  // ((w >> 4) & 0x0F0F0F0F) hold the codes of the same positions (nibble 2i and 2i + 1)
  if constexpr (AM == kAInt8) {
    a[0] = prmt(r0[0], r0[1], 0x5140);
    a[1] = prmt(r1[0], r1[1], 0x5140);
    a[2] = prmt(r0[0], r0[1], 0x7362);
    a[3] = prmt(r1[0], r1[1], 0x7362);
  } else {
    int4_to_s8(r0[0], a[0], a[2]);
    int4_to_s8(r1[0], a[1], a[3]);
  }
}

__device__ __forceinline__ void store_out(void* out, int64_t i, float v, int dtype) {
  if (dtype == static_cast<int>(DType::kFloat32)) {
    static_cast<float*>(out)[i] = v;
  } else if (dtype == static_cast<int>(DType::kFloat16)) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

// y[row, col] from the reduced 32-bit sum v: float (scaled per group already: float modes and
// grouped integer modes) or int32 (per-channel integer modes and debug)
template <int AM, bool GROUPED, bool DEBUG>
__device__ __forceinline__ void finish(const Args& p, int row, int col, uint32_t v) {
  const int64_t i = static_cast<int64_t>(row) * p.n + col;
  constexpr bool kInt = AM == kAInt8 || AM == kAInt4;
  if constexpr (DEBUG) {
    static_cast<int32_t*>(p.out)[i] = static_cast<int32_t>(v);
    return;
  } else {
    float y;
    if constexpr (kInt && GROUPED) {
      y = __uint_as_float(v) * p.x_scales[row];
    } else if constexpr (kInt) {
      y = static_cast<float>(static_cast<int32_t>(v)) * p.x_scales[row] * p.scales[col];
    } else {
      y = __uint_as_float(v);
    }
    if (p.bias != nullptr) y += p.bias[col];
    store_out(p.out, i, y, p.out_dtype);
  }
}

// After a block has written its partial sums to the workspace: whether it is the last of the
// n-tile's S split blocks to arrive (that block adds the S partials, then resets the counter).
// The fences order the partial writes before the count and the partial reads after it.
__device__ __forceinline__ bool last_split_block(const Args& p, int nt, bool& last_block) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last_block = atomicAdd(p.counters + nt, 1) == p.splits - 1;
  }
  __syncthreads();
  if (!last_block) return false;
  __threadfence();
  return true;
}

// CBQ_DEC_EPI == 0, S > 1: the epilogue one column per thread and loop pass.
template <int AM, bool GROUPED, bool DEBUG, int MT, typename Sm, typename Add>
__device__ __forceinline__ void epilogue_col(const Args& p, Sm& sm, Add add, int n0, int nt,
                                             int split, bool& last_block) {
  const int items = p.m * kTN;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kTN, col = e % kTN;
    uint32_t v = sm[0][row][col];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = add(v, sm[w][row][col]);
    p.ws[(static_cast<int64_t>(split) * 16 * MT + row) * p.n_pad + n0 + col] = v;
  }
  if (!last_split_block(p, nt, last_block)) return;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kTN, col = e % kTN;
    if (n0 + col >= p.n) continue;
    uint32_t v = __ldcg(p.ws + static_cast<int64_t>(row) * p.n_pad + n0 + col);
    for (int sp = 1; sp < p.splits; ++sp) {
      v = add(v, __ldcg(p.ws + (static_cast<int64_t>(sp) * 16 * MT + row) * p.n_pad + n0 + col));
    }
    finish<AM, GROUPED, DEBUG>(p, row, n0 + col, v);
  }
  if (threadIdx.x == 0) p.counters[nt] = 0;
}

// CBQ_DEC_EPI == 1, S > 1: the epilogue four columns at a time (the comment at CBQ_DEC_EPI says
// why).
// sm: the 4 warps' partial sums [warp][row][kTN + 8] (rows 16-byte aligned: 72 words); the
// workspace (S, 16 MT, N_pad) with N_pad a multiple of 64 and a 16-byte aligned base (checked
// by the binding). The additions are those of the one-column epilogue in the same order (warps
// 0..3, then splits 0..S-1), so the outputs are bitwise the same.
template <int AM, bool GROUPED, bool DEBUG, int MT, typename Sm, typename Add>
__device__ __forceinline__ void epilogue_vec(const Args& p, Sm& sm, Add add, int n0, int nt,
                                             int split, bool& last_block) {
  constexpr int kQuads = kTN / 4;  // 16 four-column items per row
  constexpr int kBatch = 8;        // workspace partials in flight per item
  auto add4 = [&](uint4 a, uint4 b) {
    return make_uint4(add(a.x, b.x), add(a.y, b.y), add(a.z, b.z), add(a.w, b.w));
  };
  auto finish4 = [&](int row, int col, uint4 v) {
    const uint32_t e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (n0 + col + j < p.n) finish<AM, GROUPED, DEBUG>(p, row, n0 + col + j, e[j]);
    }
  };
  const int items = p.m * kQuads;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kQuads, col = 4 * (e % kQuads);
    uint4 v = *reinterpret_cast<const uint4*>(&sm[0][row][col]);
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = add4(v, *reinterpret_cast<const uint4*>(&sm[w][row][col]));
    *reinterpret_cast<uint4*>(p.ws + (static_cast<int64_t>(split) * 16 * MT + row) * p.n_pad +
                              n0 + col) = v;
  }
  if (!last_split_block(p, nt, last_block)) return;
  const int64_t split_stride = static_cast<int64_t>(16) * MT * p.n_pad;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int row = e / kQuads, col = 4 * (e % kQuads);
    const uint4* src = reinterpret_cast<const uint4*>(p.ws + static_cast<int64_t>(row) * p.n_pad +
                                                      n0 + col);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    for (int s0 = 0; s0 < p.splits; s0 += kBatch) {
      uint4 part[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {  // all loads issued before the first add waits
        if (s0 + j < p.splits) part[j] = __ldcg(src + (s0 + j) * (split_stride / 4));
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (s0 + j < p.splits) v = s0 + j == 0 ? part[0] : add4(v, part[j]);
      }
    }
    finish4(row, col, v);
  }
  if (threadIdx.x == 0) p.counters[nt] = 0;
}

// MT: 16-row m-tiles of x per block (1, or 2 for M = 17..32; not with SWAP): each m-tile has
// its own A fragments, row sums and accumulators; the weight chunk, its conversion and the B
// fragments are shared.
// SWAP (M <= 8): the MMA computes y^T = W x^T, weights as the 16-row A operand and the
// activations as the 8-column B operand, so no MMA row is padding for M <= 8 (with x as A, 15
// of 16 rows are padding at M = 1): half the MMAs and accumulators, one activation load per
// lane, and the B operand is two consecutive registers of that load (no register moves). The
// weight layout is the same: words 2j and 2j + 1 (columns 16 j + g and 16 j + 8 + g) are rows g
// and g + 8 of n16-tile j.
template <int BITS, int AM, bool GROUPED, bool DEBUG, bool SWAP, int MT>
__global__ void __launch_bounds__(kWarps * 32, min_blocks(AM, MT)) decode_kernel(Args p) {
  constexpr bool kInt = AM == kAInt8 || AM == kAInt4;
  constexpr bool kBf16 = AM != kAFp16;
  constexpr int CK = BITS == 4 ? 32 : 64;  // K per chunk
  constexpr int kSteps = CK / 16;          // m16n8k16 steps per chunk (float modes)
  constexpr uint32_t kMask2 = BITS == 4 ? 0x000F000Fu : 0x00030003u;
  constexpr uint32_t kMagic2 = kBf16 ? 0x43004300u : 0x64006400u;  // (128, 128) / (1024, 1024)
  constexpr float kMagic = kBf16 ? 128.0f : 1024.0f;
  constexpr uint32_t kOnes2 = kInt ? 0x01010101u : (kBf16 ? 0x3F803F80u : 0x3C003C00u);
  // the accumulator that is reduced and stored: int32 for per-channel integer modes and debug
  constexpr bool kIntOut = kInt && (DEBUG || !GROUPED);
  using Acc = std::conditional_t<kInt, int32_t, float>;
  using ALd = ALoad<AM, CK>;
  static_assert(!kInt || BITS == 4, "integer activations take 4-bit containers");
  static_assert(MT >= 1 && MT <= kMaxMTiles && (MT == 1 || !SWAP), "m-tiles: 1, or 2 unswapped");
  // activation chunks in the register ring (the comment at CBQ_DEC_XPF)
  constexpr int kXpf = !SWAP ? 0 : kInt ? CBQ_DEC_XPF : CBQ_DEC_XPF_FLOAT;
  constexpr int kXpfSlots = kXpf > 0 ? kXpf : 1;
  static_assert(kDepth % kXpfSlots == 0, "CBQ_DEC_XPF(_FLOAT) divides CBQ_DEC_DEPTH");

  constexpr int kSlots = kDepth + 1;  // group scales in flight per warp (one per chunk at most)
  // dynamic shared memory (decode_smem_bytes): the group scales and zero points of each warp,
  // then each warp's ring of kDepth weight chunks, which the warp reduction reuses after the K
  // loop (+8: conflict-free 64-bit stores)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sc_sm = *reinterpret_cast<uint32_t(*)[kWarps][kSlots][2][kTN]>(smem_raw);
  auto& ring = *reinterpret_cast<uint4(*)[kWarps][kDepth][64]>(smem_raw + sizeof(sc_sm));
  auto& sm = *reinterpret_cast<uint32_t(*)[kWarps][16 * MT][kTN + 8]>(smem_raw + sizeof(sc_sm));
  __shared__ bool last_block;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x, split = blockIdx.y;
  const int n0 = nt * kTN;
  // rows g and g + 8 of each m-tile, clamped to M - 1 (rows >= M are never stored)
  int row0[MT], row1[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row0[mt] = min(16 * mt + g, p.m - 1);
    row1[mt] = min(16 * mt + g + 8, p.m - 1);
  }
  constexpr int kAcc = SWAP ? kSub / 2 : kSub;  // accumulator tiles: n16 x m8, or m16 x n8

  // this warp's chunks: split `split` of S, then quarter `warp` of it
  const int per_split = (p.chunks + p.splits - 1) / p.splits;
  const int s_begin = min(split * per_split, p.chunks);
  const int s_end = min(s_begin + per_split, p.chunks);
  const int per_warp = (s_end - s_begin + kWarps - 1) / kWarps;
  const int kb = min(s_begin + warp * per_warp, s_end);
  const int ke = min(kb + per_warp, s_end);

  Acc tmp[MT][kAcc][4];    // the MMA sums of the current segment (group)
  // row sums of x over the segment (SWAP: c[0] / c[1] rows 2t / 2t + 1; else c[0] / c[2] rows
  // g / g + 8 of the m-tile)
  Acc sumx[MT][4];
  float acc[MT][kAcc][4];  // the scaled result (float modes, grouped integer modes)
  int32_t acci[MT][kAcc][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int s = 0; s < kAcc; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        tmp[mt][s][r] = 0;
        acc[mt][s][r] = 0.f;
        acci[mt][s][r] = 0;
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) sumx[mt][r] = 0;
  }

  // the segment's sums -> the result: y += s (tmp - (magic + z) sumx) per column
  // (the segment's scales and zero points are in this warp's shared-memory slot slot_i)
  auto flush = [&](int slot_i) {
    const uint32_t(&slot)[2][kTN] = sc_sm[warp][slot_i];
    if constexpr (SWAP) {
      // tile j: c[0] / c[1] column 16 j + g, rows 2t / 2t + 1; c[2] / c[3] column 16 j + 8 + g
      const Acc sx[2] = {sumx[0][0], sumx[0][1]};
#pragma unroll
      for (int j = 0; j < kAcc; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = 16 * j + 8 * h + g;
          const int32_t z = static_cast<int32_t>(slot[1][col]);
          const float sc = __uint_as_float(slot[0][col]);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 2 * h + e;
            if constexpr (kInt) {
              const int32_t d = tmp[0][j][r] - z * sx[e];
              if constexpr (kIntOut) {
                acci[0][j][r] += d;
              } else {
                acc[0][j][r] += sc * static_cast<float>(d);
              }
            } else {
              acc[0][j][r] +=
                  fmaf(sc, tmp[0][j][r], -(sc * (kMagic + static_cast<float>(z))) * sx[e]);
            }
            tmp[0][j][r] = 0;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) sumx[0][r] = 0;
      return;
    } else {
#pragma unroll
      for (int s = 0; s < kAcc; ++s) {
        const int col = 8 * s + 2 * t;
        const int2 z = *reinterpret_cast<const int2*>(&slot[1][col]);
        const float2 sc = *reinterpret_cast<const float2*>(&slot[0][col]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const Acc sx0 = sumx[mt][0], sx1 = sumx[mt][2];
          if constexpr (kInt) {
            const int32_t d[4] = {tmp[mt][s][0] - z.x * sx0, tmp[mt][s][1] - z.y * sx0,
                                  tmp[mt][s][2] - z.x * sx1, tmp[mt][s][3] - z.y * sx1};
            if constexpr (kIntOut) {
#pragma unroll
              for (int r = 0; r < 4; ++r) acci[mt][s][r] += d[r];
            } else {
#pragma unroll
              for (int r = 0; r < 4; ++r) {
                acc[mt][s][r] += ((r & 1) ? sc.y : sc.x) * static_cast<float>(d[r]);
              }
            }
          } else {
            const float c0 = sc.x * (kMagic + static_cast<float>(z.x));
            const float c1 = sc.y * (kMagic + static_cast<float>(z.y));
            acc[mt][s][0] += fmaf(sc.x, tmp[mt][s][0], -c0 * sx0);
            acc[mt][s][1] += fmaf(sc.y, tmp[mt][s][1], -c1 * sx0);
            acc[mt][s][2] += fmaf(sc.x, tmp[mt][s][2], -c0 * sx1);
            acc[mt][s][3] += fmaf(sc.y, tmp[mt][s][3], -c1 * sx1);
          }
#pragma unroll
          for (int r = 0; r < 4; ++r) tmp[mt][s][r] = 0;
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) sumx[mt][r] = 0;
      }
    }
  };

  // a group's scales and zero points -> a slot (lanes 0-15: 64 scales, 16-31: 64 zero points,
  // 16 bytes each); groups are counted in the loop, not divided for (a 32-bit remainder per
  // chunk was ~25 of the 282 instructions per chunk in the SASS of 6f6a61d)
  const char* sc_src = reinterpret_cast<const char*>(
      (lane >> 4) ? static_cast<const void*>(p.zeros + n0 + 4 * (lane & 15))
                  : static_cast<const void*>(p.scales + n0 + 4 * (lane & 15)));
  const int64_t sc_stride = static_cast<int64_t>(p.n_pad) * 4;  // bytes per group
  auto copy_group = [&](int gi, int slot_i) {
    cp_async16(&sc_sm[warp][slot_i][lane >> 4][4 * (lane & 15)], sc_src + gi * sc_stride);
  };

  // per chunk: two fully coalesced 512-byte warp loads (word h * 4 + j of lane l at uint4
  // (chunk * 2 + h) * 32 + l)
  const uint4* base = p.words + (static_cast<int64_t>(nt) * p.chunks) * 64 + lane;
  int group = kb / p.seg_chunks;  // once per warp
  int next_flush = (group + 1) * p.seg_chunks;
  int copied = group, copy_slot = 0, next_copy = next_flush, flush_slot = 0;
  if (kb < ke) copy_group(GROUPED ? group : 0, 0);
  cp_async_commit();
  // chunk cn's weights into ring slot d: each lane copies the 32 bytes it will read itself, so
  // its own cp.async.wait_group makes them visible (no barrier)
  const char* xb0[MT];
  const char* xb1[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    xb0[mt] = ALd::lane_base(p, row0[mt], t);
    xb1[mt] = ALd::lane_base(p, row1[mt], t);
    // opaque to the compiler: kept in registers, not recomputed from the thread index in the
    // loop (it rematerialised them: S2R + 9 integer instructions per chunk)
    asm volatile("" : "+l"(xb0[mt]));
    asm volatile("" : "+l"(xb1[mt]));
  }
  auto request = [&](int cn, int d) {
    cp_async16(&ring[warp][d][lane], base + static_cast<int64_t>(cn) * 64);
    cp_async16(&ring[warp][d][32 + lane], base + static_cast<int64_t>(cn) * 64 + 32);
    if (GROUPED && cn == next_copy) {
      ++copied;
      copy_slot = copy_slot + 1 == kSlots ? 0 : copy_slot + 1;
      copy_group(copied, copy_slot);
      next_copy += p.seg_chunks;
    }
  };
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    if (kb + d < ke) request(kb + d, d);
    cp_async_commit();
  }
  // Programmatic dependent launch (launched with it: Args::pdl): everything above reads only
  // the weight, its scales and zero points, which no kernel writes, so it may overlap the
  // previous kernel in the stream; x, the workspace, the counters and the output are touched
  // only after that kernel has finished and its writes are visible. Without the launch
  // attribute the wait returns at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  // chunk c's activations take the vector loads (else ALd::slow, element by element)
  auto x_fast = [&](int c) { return p.vec_x && (c + 1) * CK <= p.k; };
  // the swapped instances' activation ring (CBQ_DEC_XPF): chunk c in slot (c - kb) % kXpf,
  // which is d % kXpf in the loop below (kXpf divides kDepth)
  uint32_t xr[kXpfSlots][ALd::kRegs];
  if constexpr (kXpf > 0) {
#pragma unroll
    for (int j = 0; j < kXpf; ++j) {
      if (kb + j < ke && x_fast(kb + j)) {
        ALd::fast_at(xr[j], xb0[0] + static_cast<int64_t>(kb + j) * ALd::kChunkBytes);
      }
    }
  }

  for (int kc = kb; kc < ke; kc += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int c = kc + d;
      if (c < ke) {
        // chunk c's copies (and the scales of any group starting at c) were committed kDepth
        // groups ago
        cp_async_wait<kDepth - 1>();
        if (c == next_flush) {
          __syncwarp();
          flush(flush_slot);
          if (GROUPED) flush_slot = flush_slot + 1 == kSlots ? 0 : flush_slot + 1;
          next_flush += p.seg_chunks;
        }
        const uint4 w0 = ring[warp][d][lane], w1 = ring[warp][d][32 + lane];
        const uint32_t w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        uint32_t r0[MT][ALd::kRegs], r1[MT][ALd::kRegs];
        bool from_ring = false;
        if constexpr (kXpf > 0) {
          if (x_fast(c)) {
#pragma unroll
            for (int i = 0; i < ALd::kRegs; ++i) r0[0][i] = xr[d % kXpfSlots][i];
            from_ring = true;
          }
        }
        if (from_ring) {
        } else if (p.vec_x && (c + 1) * CK <= p.k) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            ALd::fast_at(r0[mt], xb0[mt] + static_cast<int64_t>(c) * ALd::kChunkBytes);
            if constexpr (!SWAP) {
              ALd::fast_at(r1[mt], xb1[mt] + static_cast<int64_t>(c) * ALd::kChunkBytes);
            }
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            ALd::slow(r0[mt], p, row0[mt], c, t);
            if constexpr (!SWAP) ALd::slow(r1[mt], p, row1[mt], c, t);
          }
        }
        if constexpr (SWAP && kInt) {
          // B = x (k32 x m8): b0 = row g's K slots 4t.., b1 = slots 16 + 4t.. (to_fragments)
          uint32_t xa[4];
          int_fragments<AM>(xa, r0[0], r0[0]);
          const uint32_t ones[4] = {kOnes2, kOnes2, kOnes2, kOnes2};
          ptx::mma_s8(sumx[0], ones, xa[0], xa[2]);
#pragma unroll
          for (int j = 0; j < kAcc; ++j) {
            const uint32_t a[4] = {w[2 * j] & 0x0F0F0F0Fu, w[2 * j + 1] & 0x0F0F0F0Fu,
                                   (w[2 * j] >> 4) & 0x0F0F0F0Fu, (w[2 * j + 1] >> 4) & 0x0F0F0F0Fu};
            ptx::mma_s8(tmp[0][j], a, xa[0], xa[2]);
          }
        } else if constexpr (SWAP) {
#pragma unroll
          for (int u = 0; u < kSteps; ++u) {
            // B = x (k16 x m8): pairs 2u (K slots 2t, 2t + 1) and 2u + 1 (slots 2t + 8, 2t + 9)
            const uint32_t b0 = r0[0][2 * u], b1 = r0[0][2 * u + 1];
            const uint32_t ones[4] = {kOnes2, kOnes2, kOnes2, kOnes2};
            ptx::mma16816<kBf16>(sumx[0], ones, b0, b1);
#pragma unroll
            for (int j = 0; j < kAcc; ++j) {
              const uint32_t a[4] = {and_or(w[2 * j] >> (BITS * (2 * u)), kMask2, kMagic2),
                                     and_or(w[2 * j + 1] >> (BITS * (2 * u)), kMask2, kMagic2),
                                     and_or(w[2 * j] >> (BITS * (2 * u + 1)), kMask2, kMagic2),
                                     and_or(w[2 * j + 1] >> (BITS * (2 * u + 1)), kMask2, kMagic2)};
              ptx::mma16816<kBf16>(tmp[0][j], a, b0, b1);
            }
          }
        } else if constexpr (kInt) {
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            int_fragments<AM>(a[mt], r0[mt], r1[mt]);
            ptx::mma_s8(sumx[mt], a[mt], kOnes2, kOnes2);
          }
#pragma unroll
          for (int s = 0; s < kAcc; ++s) {
            const uint32_t b0 = w[s] & 0x0F0F0F0Fu, b1 = (w[s] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::mma_s8(tmp[mt][s], a[mt], b0, b1);
          }
        } else {
#pragma unroll
          for (int u = 0; u < kSteps; ++u) {
            // step u: pairs 2u (K slots 2t, 2t + 1) and 2u + 1 (slots 2t + 8, 2t + 9)
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              a[mt][0] = r0[mt][2 * u];
              a[mt][1] = r1[mt][2 * u];
              a[mt][2] = r0[mt][2 * u + 1];
              a[mt][3] = r1[mt][2 * u + 1];
              ptx::mma16816<kBf16>(sumx[mt], a[mt], kOnes2, kOnes2);
            }
#pragma unroll
            for (int s = 0; s < kAcc; ++s) {
              const uint32_t b0 = and_or(w[s] >> (BITS * (2 * u)), kMask2, kMagic2);
              const uint32_t b1 = and_or(w[s] >> (BITS * (2 * u + 1)), kMask2, kMagic2);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) ptx::mma16816<kBf16>(tmp[mt][s], a[mt], b0, b1);
            }
          }
        }
        // the activations kXpf chunks ahead into the ring slot just consumed
        if constexpr (kXpf > 0) {
          const int cn = c + kXpf;
          if (cn < ke && x_fast(cn)) {
            ALd::fast_at(xr[d % kXpfSlots], xb0[0] + static_cast<int64_t>(cn) * ALd::kChunkBytes);
          }
        }
        // refill the slot just consumed (after its last use: no register copies)
        if (c + kDepth < ke) request(c + kDepth, d);
        cp_async_commit();
      }
    }
  }
  cp_async_wait<0>();
  // the next kernel (if launched with PDL) may start its own weight prefetch now
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
  __syncwarp();
  if (kb < ke) flush(flush_slot);

  // reduce the 4 warps through shared memory, in warp order (sm reuses the rings: every warp
  // must be done with its ring first)
  __syncthreads();
  if constexpr (SWAP) {
#pragma unroll
    for (int j = 0; j < kAcc; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // row 2t + (r & 1), column 16 j + 8 (r >> 1) + g
        sm[warp][2 * t + (r & 1)][16 * j + 8 * (r >> 1) + g] =
            kIntOut ? static_cast<uint32_t>(acci[0][j][r]) : __float_as_uint(acc[0][j][r]);
      }
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int s = 0; s < kAcc; ++s) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows 16 mt + g, 16 mt + g + 8
          uint2 v;
          if constexpr (kIntOut) {
            v = make_uint2(static_cast<uint32_t>(acci[mt][s][2 * h]),
                           static_cast<uint32_t>(acci[mt][s][2 * h + 1]));
          } else {
            v = make_uint2(__float_as_uint(acc[mt][s][2 * h]),
                           __float_as_uint(acc[mt][s][2 * h + 1]));
          }
          *reinterpret_cast<uint2*>(&sm[warp][16 * mt + g + 8 * h][8 * s + 2 * t]) = v;
        }
      }
    }
  }
  __syncthreads();
  auto add = [](uint32_t a, uint32_t b) -> uint32_t {
    if constexpr (kIntOut) {
      return static_cast<uint32_t>(static_cast<int32_t>(a) + static_cast<int32_t>(b));
    } else {
      return __float_as_uint(__uint_as_float(a) + __uint_as_float(b));
    }
  };
  const int items = p.m * kTN;
  if (p.splits == 1) {
    for (int e = threadIdx.x; e < items; e += blockDim.x) {
      const int row = e / kTN, col = e % kTN;
      if (n0 + col >= p.n) continue;
      uint32_t v = sm[0][row][col];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v = add(v, sm[w][row][col]);
      finish<AM, GROUPED, DEBUG>(p, row, n0 + col, v);
    }
    return;
  }
  if constexpr (CBQ_DEC_EPI == 1) {
    epilogue_vec<AM, GROUPED, DEBUG, MT>(p, sm, add, n0, nt, split, last_block);
  } else {
    epilogue_col<AM, GROUPED, DEBUG, MT>(p, sm, add, n0, nt, split, last_block);
  }
}

constexpr size_t kScaleBytes = sizeof(uint32_t) * kWarps * (kDepth + 1) * 2 * kTN;
constexpr size_t kRingBytes = sizeof(uint4) * kWarps * kDepth * 64;
// the reduction reuses the rings: 18 KB per m-tile (MT = 2: 36 KB, more than the 32 KB rings)
constexpr size_t smem_bytes(int mt) {
  return kScaleBytes + (kRingBytes > sizeof(uint32_t) * kWarps * 16 * mt * (kTN + 8)
                            ? kRingBytes
                            : sizeof(uint32_t) * kWarps * 16 * mt * (kTN + 8));
}

template <int BITS, int AM, bool DEBUG>
void launch(const Args& p, bool grouped, int device, cudaStream_t stream) {
  const dim3 grid(p.n_pad / kTN, p.splits);
  // M <= 8: swapped operands; 9..16: one m-tile; 17..32: two (decode_ws_rows says the same)
  const int variant = p.m <= 8 ? 0 : (p.m <= 16 ? 1 : 2);
  using Kernel = void (*)(Args);
  const Kernel kernels[2][3] = {{decode_kernel<BITS, AM, false, DEBUG, true, 1>,
                                 decode_kernel<BITS, AM, false, DEBUG, false, 1>,
                                 decode_kernel<BITS, AM, false, DEBUG, false, 2>},
                                {decode_kernel<BITS, AM, true, DEBUG, true, 1>,
                                 decode_kernel<BITS, AM, true, DEBUG, false, 1>,
                                 decode_kernel<BITS, AM, true, DEBUG, false, 2>}};
  const Kernel kernel = kernels[grouped][variant];
  const size_t smem = smem_bytes(variant == 2 ? 2 : 1);
  // more dynamic shared memory than the 48 KB default: allowed once per kernel and device
  static uint32_t attr_set[6] = {0u, 0u, 0u, 0u, 0u, 0u};  // bit d: set on device d (< 32)
  const int which = 3 * grouped + variant;
  const uint32_t bit = device < 32 ? 1u << device : 0u;
  if (!(attr_set[which] & bit)) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute");
    attr_set[which] |= bit;
  }
  if (!p.pdl) {
    kernel<<<grid, kWarps * 32, smem, stream>>>(p);
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kWarps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p), "cudaLaunchKernelEx (PDL)");
}

}  // namespace

int decode_tile_n(int) { return kTN; }
int decode_chunk_k(int bits) { return bits == 2 ? 64 : 32; }
int decode_max_m() { return 16 * kMaxMTiles; }
int decode_ws_rows(int m) { return m <= 16 ? 16 : 16 * kMaxMTiles; }

void gemm_decode_cuda(const void* x, const float* x_scales, int a_mode, const int32_t* words,
                      const float* scales, const int32_t* zeros, const float* bias, void* out,
                      void* ws, int32_t* counters, int64_t m, int64_t n, int64_t k,
                      int64_t n_pad, int64_t ldx, int bits, int64_t group_size, int splits,
                      int out_dtype, bool debug, bool pdl, int device, std::uintptr_t stream) {
  int previous = 0;
  check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  const int ck = decode_chunk_k(bits);
  Args p{};
  p.x = x;
  p.x_scales = x_scales;
  p.words = reinterpret_cast<const uint4*>(words);
  p.scales = scales;
  p.zeros = zeros;
  p.bias = bias;
  p.out = out;
  p.ws = static_cast<uint32_t*>(ws);
  p.counters = counters;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.n_pad = static_cast<int>(n_pad);
  p.chunks = static_cast<int>((k + ck - 1) / ck);
  const bool grouped = group_size < k;
  const bool is_int = a_mode == kAInt8 || a_mode == kAInt4;
  // segments: a group; per channel: the whole K (integer: int32 is exact), or 128 K (float:
  // keeps the fp32 sums of (128 + q) x small)
  p.seg_chunks = static_cast<int>(grouped ? group_size / ck : (is_int ? p.chunks : kFloatSegment));
  p.splits = splits;
  p.ldx = ldx;
  p.out_dtype = out_dtype;
  if (pdl) {  // the launch attribute needs compute capability 9.0 (griddepcontrol)
    int major = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
               "compute capability");
    p.pdl = major >= 9;
  }
  const auto addr = reinterpret_cast<std::uintptr_t>(x);
  if (a_mode == kABf16 || a_mode == kAFp16) {
    p.vec_x = addr % 16 == 0 && ldx % 8 == 0;
  } else if (a_mode == kAInt8) {
    p.vec_x = addr % 8 == 0 && ldx % 8 == 0;
  } else {
    p.vec_x = addr % 4 == 0;
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (bits == 2) {
    if (a_mode == kABf16) launch<2, kABf16, false>(p, grouped, device, s);
    else launch<2, kAFp16, false>(p, grouped, device, s);
  } else if (a_mode == kABf16) {
    launch<4, kABf16, false>(p, grouped, device, s);
  } else if (a_mode == kAFp16) {
    launch<4, kAFp16, false>(p, grouped, device, s);
  } else if (a_mode == kAInt8) {
    if (debug) launch<4, kAInt8, true>(p, grouped, device, s);
    else launch<4, kAInt8, false>(p, grouped, device, s);
  } else {
    if (debug) launch<4, kAInt4, true>(p, grouped, device, s);
    else launch<4, kAInt4, false>(p, grouped, device, s);
  }
  const cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check_cuda(err, "gemm_decode launch");
}

}  // namespace cbq
