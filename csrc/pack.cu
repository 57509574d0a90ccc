// CUDA implementations of pack / unpack / dequantize. All three are memory-bound: the goal is
// the copy bandwidth of the card, so every thread moves one packed 32-bit word and the bytes
// that belong to it with the widest aligned accesses available.
//
// Two paths per op:
//  - flat: when every row is a whole number of words (k % C == 0, C codes per word) the
//    (n, k) codes are one flat run of words, word i holding codes [i*C, (i+1)*C); its codes
//    (C bytes, or C outputs) are moved with one or two vector accesses. Needs 16-byte aligned
//    base pointers, which fresh PyTorch allocations always are.
//  - rows: any k (the last word of each row is padded), any alignment; byte accesses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cbq/format.h"
#include "cbq/ops.h"

namespace cbq {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the loops below stride over the rest

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cbq_kernels._C: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Runs the launch on `device` and restores the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// A byte-wise mask: each of the 4 bytes of the result holds `m`.
constexpr uint32_t bytes_of(uint32_t m) { return m * 0x01010101u; }

// 4 bytes, each < 16, into their 16-bit nibble packing (byte j -> bits 4j..4j+3), and back.
__device__ __forceinline__ uint32_t squeeze4(uint32_t x) {
  x = (x | (x >> 4)) & 0x00FF00FFu;
  return (x | (x >> 8)) & 0x0000FFFFu;
}
__device__ __forceinline__ uint32_t spread4(uint32_t x) {
  x = (x | (x << 8)) & 0x00FF00FFu;
  return (x | (x << 4)) & 0x0F0F0F0Fu;
}
// 4 bytes, each < 4, into 8 bits (byte j -> bits 2j..2j+1), and back.
__device__ __forceinline__ uint32_t squeeze2(uint32_t x) {
  x = (x | (x >> 6)) & 0x000F000Fu;
  return (x | (x >> 12)) & 0x000000FFu;
}
__device__ __forceinline__ uint32_t spread2(uint32_t x) {
  x = (x | (x << 12)) & 0x000F000Fu;
  return (x | (x << 6)) & 0x03030303u;
}

// ---------------------------------------------------------------- rows paths

// Word i of the rows layout: its row, the first code it holds and how many it holds (the
// last word of a row may be partial).
template <typename Index>
struct RowWords {
  Index k, per_word, words_per_row;
  __device__ RowWords(Index k_, int cb)
      : k(k_), per_word(32 / cb), words_per_row((k_ + 32 / cb - 1) / (32 / cb)) {}
  struct Word {
    Index row, k0, count;
  };
  __device__ Word operator[](Index i) const {
    const Index row = i / words_per_row;
    const Index k0 = (i - row * words_per_row) * per_word;
    return {row, k0, k - k0 < per_word ? k - k0 : per_word};
  }
};

// ---------------------------------------------------------------- pack

// `limit` holds, per byte, the largest valid code (2^bits - 1); any bit above it is an error.
template <int CB, typename Index>
__global__ void pack_flat_kernel(const uint8_t* __restrict__ codes, uint32_t* __restrict__ packed,
                                 Index words, uint32_t limit, int32_t* __restrict__ error_flag) {
  constexpr uint32_t keep = bytes_of((1u << CB) - 1u);
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < words;
       i += Index{gridDim.x} * kThreads) {
    uint32_t word;
    uint32_t bad;
    if constexpr (CB == 8) {
      word = reinterpret_cast<const uint32_t*>(codes)[i];
      bad = 0;
    } else if constexpr (CB == 4) {
      const uint2 x = reinterpret_cast<const uint2*>(codes)[i];
      bad = (x.x | x.y) & ~limit;
      word = squeeze4(x.x & keep) | (squeeze4(x.y & keep) << 16);
    } else {
      const uint4 x = reinterpret_cast<const uint4*>(codes)[i];
      bad = (x.x | x.y | x.z | x.w) & ~limit;
      word = squeeze2(x.x & keep) | (squeeze2(x.y & keep) << 8) | (squeeze2(x.z & keep) << 16) |
             (squeeze2(x.w & keep) << 24);
    }
    packed[i] = word;
    if (bad) atomicOr(error_flag, 1);
  }
}

template <typename Index>
__global__ void pack_rows_kernel(const uint8_t* __restrict__ codes, uint32_t* __restrict__ packed,
                                 Index n, Index k, int cb, uint32_t limit,
                                 int32_t* __restrict__ error_flag) {
  const RowWords<Index> words(k, cb);
  const uint32_t keep = (1u << cb) - 1u;
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < n * words.words_per_row;
       i += Index{gridDim.x} * kThreads) {
    const auto [row, k0, count] = words[i];
    const uint8_t* src = codes + row * k + k0;
    uint32_t word = 0;
    uint32_t bad = 0;
    for (Index j = 0; j < count; ++j) {
      const uint32_t code = src[j];
      bad |= code & ~limit;
      word |= (code & keep) << (j * cb);
    }
    packed[i] = word;
    if (bad) atomicOr(error_flag, 1);
  }
}

// ---------------------------------------------------------------- unpack

template <int CB, typename Index>
__global__ void unpack_flat_kernel(const uint32_t* __restrict__ packed, uint8_t* __restrict__ codes,
                                   Index words) {
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < words;
       i += Index{gridDim.x} * kThreads) {
    const uint32_t w = packed[i];
    if constexpr (CB == 8) {
      reinterpret_cast<uint32_t*>(codes)[i] = w;
    } else if constexpr (CB == 4) {
      reinterpret_cast<uint2*>(codes)[i] = make_uint2(spread4(w & 0xFFFFu), spread4(w >> 16));
    } else {
      reinterpret_cast<uint4*>(codes)[i] =
          make_uint4(spread2(w & 0xFFu), spread2((w >> 8) & 0xFFu), spread2((w >> 16) & 0xFFu),
                     spread2(w >> 24));
    }
  }
}

template <typename Index>
__global__ void unpack_rows_kernel(const uint32_t* __restrict__ packed, uint8_t* __restrict__ codes,
                                   Index n, Index k, int cb) {
  const RowWords<Index> words(k, cb);
  const uint32_t keep = (1u << cb) - 1u;
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < n * words.words_per_row;
       i += Index{gridDim.x} * kThreads) {
    const auto [row, k0, count] = words[i];
    const uint32_t w = packed[i];
    uint8_t* dst = codes + row * k + k0;
    for (Index j = 0; j < count; ++j) dst[j] = static_cast<uint8_t>((w >> (j * cb)) & keep);
  }
}

// ---------------------------------------------------------------- dequantize

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The C outputs of one word, stored with 16-byte (or, when smaller, whole) vector stores.
template <typename T, int C>
struct alignas(sizeof(T) * C >= 16 ? 16 : sizeof(T) * C) OutVec {
  T v[C];
};

// ONE_GROUP: group_size % C == 0, so all codes of a word share one scale and zero point.
template <int CB, typename T, bool ONE_GROUP, typename Index>
__global__ void dequantize_flat_kernel(const uint32_t* __restrict__ packed,
                                       const float* __restrict__ scales,
                                       const float* __restrict__ zeros, T* __restrict__ out,
                                       Index words, Index words_per_row, Index group_size,
                                       Index groups, float z_default) {
  constexpr int C = 32 / CB;
  constexpr uint32_t keep = (1u << CB) - 1u;
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < words;
       i += Index{gridDim.x} * kThreads) {
    const uint32_t w = packed[i];
    const Index row = i / words_per_row;
    const Index k0 = (i - row * words_per_row) * C;
    OutVec<T, C> o;
    if constexpr (ONE_GROUP) {
      const Index g = row * groups + k0 / group_size;
      const float s = scales[g];
      const float z = zeros ? zeros[g] : z_default;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        o.v[j] = from_float<T>((static_cast<float>((w >> (j * CB)) & keep) - z) * s);
      }
    } else {
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const Index g = row * groups + (k0 + j) / group_size;
        const float z = zeros ? zeros[g] : z_default;
        o.v[j] = from_float<T>((static_cast<float>((w >> (j * CB)) & keep) - z) * scales[g]);
      }
    }
    reinterpret_cast<OutVec<T, C>*>(out)[i] = o;
  }
}

template <typename T, typename Index>
__global__ void dequantize_rows_kernel(const uint32_t* __restrict__ packed,
                                       const float* __restrict__ scales,
                                       const float* __restrict__ zeros, T* __restrict__ out,
                                       Index n, Index k, int cb, Index group_size, Index groups,
                                       float z_default) {
  const RowWords<Index> words(k, cb);
  const uint32_t keep = (1u << cb) - 1u;
  for (Index i = blockIdx.x * Index{kThreads} + threadIdx.x; i < n * words.words_per_row;
       i += Index{gridDim.x} * kThreads) {
    const auto [row, k0, count] = words[i];
    const uint32_t w = packed[i];
    for (Index j = 0; j < count; ++j) {
      const Index g = row * groups + (k0 + j) / group_size;
      const float z = zeros ? zeros[g] : z_default;
      out[row * k + k0 + j] =
          from_float<T>((static_cast<float>((w >> (j * cb)) & keep) - z) * scales[g]);
    }
  }
}

// Calls f(std::integral_constant<int, CB>{}) for the container width of `bits`.
template <typename F>
void with_container(int bits, F&& f) {
  switch (container_bits(bits)) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// 32-bit indices when they fit: the flat kernels divide by words_per_row once per word, and
// a 64-bit division costs several times a 32-bit one.
template <typename F>
void with_index(int64_t max_index, F&& f) {
  if (max_index < (int64_t{1} << 31)) {
    f(uint32_t{0});
  } else {
    f(uint64_t{0});
  }
}

template <typename F>
void with_out_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace

void pack_cuda(const uint8_t* codes, int32_t* packed, int32_t* error_flag, int64_t n, int64_t k,
               int bits, int device, std::uintptr_t stream) {
  const int64_t words = n * packed_words(k, bits);
  if (words == 0) return;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const uint32_t limit = bytes_of((1u << bits) - 1u);
  auto* out = reinterpret_cast<uint32_t*>(packed);
  const bool flat = k % codes_per_word(bits) == 0 && aligned16(codes) && aligned16(packed);
  with_index(n * k + kThreads, [&](auto index) {
    using Index = decltype(index);
    if (flat) {
      with_container(bits, [&](auto cb) {
        pack_flat_kernel<decltype(cb)::value, Index>
            <<<grid_for(words), kThreads, 0, s>>>(codes, out, words, limit, error_flag);
      });
    } else {
      pack_rows_kernel<Index><<<grid_for(words), kThreads, 0, s>>>(
          codes, out, n, k, container_bits(bits), limit, error_flag);
    }
  });
  check_cuda(cudaGetLastError(), "pack kernel launch");
}

void unpack_cuda(const int32_t* packed, uint8_t* codes, int64_t n, int64_t k, int bits,
                 int device, std::uintptr_t stream) {
  const int64_t words = n * packed_words(k, bits);
  if (words == 0 || k == 0) return;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* in = reinterpret_cast<const uint32_t*>(packed);
  const bool flat = k % codes_per_word(bits) == 0 && aligned16(codes) && aligned16(packed);
  with_index(n * k + kThreads, [&](auto index) {
    using Index = decltype(index);
    if (flat) {
      with_container(bits, [&](auto cb) {
        unpack_flat_kernel<decltype(cb)::value, Index>
            <<<grid_for(words), kThreads, 0, s>>>(in, codes, words);
      });
    } else {
      unpack_rows_kernel<Index>
          <<<grid_for(words), kThreads, 0, s>>>(in, codes, n, k, container_bits(bits));
    }
  });
  check_cuda(cudaGetLastError(), "unpack kernel launch");
}

void dequantize_cuda(const int32_t* packed, const float* scales, const float* zeros, void* out,
                     int64_t n, int64_t k, int bits, int64_t group_size, DType out_dtype,
                     int device, std::uintptr_t stream) {
  const int64_t words_per_row = packed_words(k, bits);
  const int64_t words = n * words_per_row;
  if (words == 0 || k == 0) return;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* in = reinterpret_cast<const uint32_t*>(packed);
  const int per_word = codes_per_word(bits);
  const int64_t groups = num_groups(k, group_size);
  const float z_default = default_zero_point(bits);
  const bool flat = k % per_word == 0 && aligned16(packed) && aligned16(out);
  const bool one_group = group_size % per_word == 0;
  with_index(n * k + kThreads, [&](auto index) {
    using Index = decltype(index);
    with_out_type(out_dtype, [&](auto tag) {
      using T = decltype(tag);
      T* o = static_cast<T*>(out);
      if (!flat) {
        dequantize_rows_kernel<T, Index><<<grid_for(words), kThreads, 0, s>>>(
            in, scales, zeros, o, n, k, container_bits(bits), group_size, groups, z_default);
        return;
      }
      with_container(bits, [&](auto cb) {
        constexpr int CB = decltype(cb)::value;
        if (one_group) {
          dequantize_flat_kernel<CB, T, true, Index><<<grid_for(words), kThreads, 0, s>>>(
              in, scales, zeros, o, words, words_per_row, group_size, groups, z_default);
        } else {
          dequantize_flat_kernel<CB, T, false, Index><<<grid_for(words), kThreads, 0, s>>>(
              in, scales, zeros, o, words, words_per_row, group_size, groups, z_default);
        }
      });
    });
  });
  check_cuda(cudaGetLastError(), "dequantize kernel launch");
}

}  // namespace cbq
