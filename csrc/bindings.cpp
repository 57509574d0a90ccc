// The Python binding of cbq_kernels._C. It takes raw addresses, sizes and the CUDA stream
// from the Python layer (cbq_kernels/packing.py) instead of torch tensors, so that the module
// does not link against libtorch: one build serves every installed torch version, and the
// CPU-only and CUDA builds share this file.
//
// The Python layer validates tensors (dtype, shape, device, contiguity) before calling in;
// the checks here keep a direct call of this module from touching memory out of bounds
// given consistent sizes.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cbq/check.h"
#include "cbq/format.h"
#include "cbq/ops.h"

namespace py = pybind11;

namespace cbq {
namespace {

using Ptr = std::uintptr_t;

int64_t py_pack_cpu(Ptr codes, Ptr packed, int64_t n, int64_t k, int bits) {
  check_bits(bits);
  check_sizes(n, k);
  check_ptr(codes, n * k, "codes");
  check_ptr(packed, n * packed_words(k, bits), "packed");
  return pack_cpu(reinterpret_cast<const uint8_t*>(codes), reinterpret_cast<int32_t*>(packed), n,
                  k, bits);
}

void py_unpack_cpu(Ptr packed, Ptr codes, int64_t n, int64_t k, int bits) {
  check_bits(bits);
  check_sizes(n, k);
  check_ptr(packed, n * packed_words(k, bits), "packed");
  check_ptr(codes, n * k, "codes");
  unpack_cpu(reinterpret_cast<const int32_t*>(packed), reinterpret_cast<uint8_t*>(codes), n, k,
             bits);
}

void check_dequantize(Ptr packed, Ptr scales, Ptr out, int64_t n, int64_t k, int bits,
                      int64_t group_size) {
  check_bits(bits);
  check_sizes(n, k);
  check_group(group_size);
  check_ptr(packed, n * packed_words(k, bits), "packed");
  check_ptr(scales, n * num_groups(k, group_size), "scales");
  check_ptr(out, n * k, "out");
}

void py_dequantize_cpu(Ptr packed, Ptr scales, Ptr zeros, Ptr out, int64_t n, int64_t k, int bits,
                       int64_t group_size, int out_dtype) {
  check_dequantize(packed, scales, out, n, k, bits, group_size);
  dequantize_cpu(reinterpret_cast<const int32_t*>(packed), reinterpret_cast<const float*>(scales),
                 reinterpret_cast<const float*>(zeros), reinterpret_cast<void*>(out), n, k, bits,
                 group_size, check_dtype(out_dtype));
}

#ifdef CBQ_WITH_CUDA
void py_pack_cuda(Ptr codes, Ptr packed, Ptr error_flag, int64_t n, int64_t k, int bits,
                  int device, Ptr stream) {
  check_bits(bits);
  check_sizes(n, k);
  check_ptr(codes, n * k, "codes");
  check_ptr(packed, n * packed_words(k, bits), "packed");
  check_ptr(error_flag, 1, "error_flag");
  pack_cuda(reinterpret_cast<const uint8_t*>(codes), reinterpret_cast<int32_t*>(packed),
            reinterpret_cast<int32_t*>(error_flag), n, k, bits, device, stream);
}

void py_unpack_cuda(Ptr packed, Ptr codes, int64_t n, int64_t k, int bits, int device,
                    Ptr stream) {
  check_bits(bits);
  check_sizes(n, k);
  check_ptr(packed, n * packed_words(k, bits), "packed");
  check_ptr(codes, n * k, "codes");
  unpack_cuda(reinterpret_cast<const int32_t*>(packed), reinterpret_cast<uint8_t*>(codes), n, k,
              bits, device, stream);
}

void py_dequantize_cuda(Ptr packed, Ptr scales, Ptr zeros, Ptr out, int64_t n, int64_t k,
                        int bits, int64_t group_size, int out_dtype, int device, Ptr stream) {
  check_dequantize(packed, scales, out, n, k, bits, group_size);
  dequantize_cuda(reinterpret_cast<const int32_t*>(packed),
                  reinterpret_cast<const float*>(scales), reinterpret_cast<const float*>(zeros),
                  reinterpret_cast<void*>(out), n, k, bits, group_size, check_dtype(out_dtype),
                  device, stream);
}

void py_gemm_decode_cuda(Ptr x, Ptr x_scales, int a_mode, Ptr words, Ptr scales, Ptr zeros,
                         Ptr bias, Ptr out, Ptr ws, Ptr counters, int64_t m, int64_t n,
                         int64_t k, int64_t n_pad, int64_t ldx, int bits, int64_t group_size,
                         int splits, int out_dtype, bool debug, bool pdl, int device,
                         Ptr stream) {
  CBQ_CHECK(bits == 2 || bits == 4, "decode GEMM bits must be 2 or 4 (containers), got ", bits);
  CBQ_CHECK(a_mode >= 0 && a_mode <= 3, "unknown activation mode ", a_mode);
  CBQ_CHECK(bits == 4 || a_mode <= 1, "2-bit weights take bf16 / fp16 activations only");
  CBQ_CHECK(!debug || a_mode >= 2, "debug (raw int32 output) exists for integer activations only");
  CBQ_CHECK(m >= 1 && m <= decode_max_m(), "decode GEMM takes 1 <= M <= ", decode_max_m(),
            ", got ", m);
  CBQ_CHECK(n >= 1 && k >= 1, "decode GEMM needs N >= 1 and K >= 1, got n=", n, " k=", k);
  const int64_t tn = decode_tile_n(bits), ck = decode_chunk_k(bits);
  CBQ_CHECK(n_pad % tn == 0 && n_pad >= n, "n_pad must be a multiple of ", tn, " >= n");
  CBQ_CHECK(group_size >= k || (group_size > 0 && group_size % ck == 0),
            "decode GEMM groups must be multiples of ", ck, " for ", bits, "-bit containers, got ",
            group_size);
  CBQ_CHECK(splits >= 1 && splits <= 1024, "splits must be in [1, 1024], got ", splits);
  check_dtype(out_dtype);
  check_ptr(x, m * k, "x");
  check_ptr(words, n_pad * ((k + ck - 1) / ck) * ck, "words");
  check_ptr(scales, n_pad, "scales");
  check_ptr(zeros, n_pad, "zeros");
  check_ptr(out, m * n, "out");
  check_ptr(counters, n_pad / tn, "counters");
  if (a_mode >= 2) check_ptr(x_scales, m, "x_scales");
  if (splits > 1) {
    check_ptr(ws, splits * decode_ws_rows(static_cast<int>(m)) * n_pad, "ws");
    // the epilogue reads and writes the workspace 16 bytes at a time
    CBQ_CHECK(ws % 16 == 0, "decode GEMM workspace must be 16-byte aligned");
  }
  gemm_decode_cuda(reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(x_scales),
                   a_mode, reinterpret_cast<const int32_t*>(words),
                   reinterpret_cast<const float*>(scales), reinterpret_cast<const int32_t*>(zeros),
                   reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(out),
                   reinterpret_cast<void*>(ws), reinterpret_cast<int32_t*>(counters), m, n, k,
                   n_pad, ldx, bits, group_size, splits, out_dtype, debug, pdl, device, stream);
}

// The argument checks of both Hadamard kernels (csrc/hadamard_quant.cu, hadamard_quant_reg.cu)
void check_hadamard_args(Ptr x, Ptr signs, Ptr small, Ptr codes, Ptr scales, int64_t rows,
                         int64_t n, int64_t m, int64_t mp, int64_t p, int bits, int in_dtype,
                         float ratio) {
  CBQ_CHECK(bits == 4 || bits == 8, "hadamard_quant bits must be 4 or 8, got ", bits);
  CBQ_CHECK(rows >= 0, "rows must be >= 0, got ", rows);
  CBQ_CHECK(m >= 1 && p >= 32 && (p & (p - 1)) == 0 && n == m * p,
            "width n must be m * p with p a power of two >= 32, got n=", n, " m=", m, " p=", p);
  CBQ_CHECK(n <= 32768, "width must be at most 32768, got ", n);
  CBQ_CHECK(mp >= m && mp % 16 == 0, "mp must be a multiple of 16 >= m, got ", mp);
  CBQ_CHECK(ratio > 0.f && ratio <= 1.f, "clip ratio must be in (0, 1], got ", ratio);
  check_dtype(in_dtype);
  CBQ_CHECK(x % 16 == 0, "x must be 16-byte aligned");
  check_ptr(x, rows * n, "x");
  check_ptr(signs, n, "signs");
  check_ptr(small, m * mp, "small");
  check_ptr(codes, rows * n / (bits == 8 ? 4 : 8), "codes");
  check_ptr(scales, rows, "scales");
}

void py_hadamard_quant_cuda(Ptr x, Ptr signs, Ptr small, Ptr codes, Ptr scales, int64_t rows,
                            int64_t n, int64_t m, int64_t mp, int64_t p, int bits,
                            int in_dtype, bool mma, float ratio, float inv_sqrt_n, int device,
                            Ptr stream) {
  check_hadamard_args(x, signs, small, codes, scales, rows, n, m, mp, p, bits, in_dtype, ratio);
  hadamard_quant_cuda(reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(signs),
                      reinterpret_cast<const float*>(small), reinterpret_cast<int32_t*>(codes),
                      reinterpret_cast<float*>(scales), rows, n, m, mp, p, bits, in_dtype, mma,
                      ratio, inv_sqrt_n, device, stream);
}

void py_hadamard_quant_reg_cuda(Ptr x, Ptr signs, Ptr small, Ptr codes, Ptr scales,
                                int64_t rows, int64_t n, int64_t m, int64_t mp, int64_t p,
                                int bits, int in_dtype, int variant, float ratio, float inv_sqrt_n,
                                int device, Ptr stream) {
  check_hadamard_args(x, signs, small, codes, scales, rows, n, m, mp, p, bits, in_dtype, ratio);
  CBQ_CHECK(variant >= 0 && variant <= 3, "hadamard_quant_reg variant must be 0, 1, 2 or 3, got ",
            variant);
  hadamard_quant_reg_cuda(reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(signs),
                          reinterpret_cast<const float*>(small), reinterpret_cast<int32_t*>(codes),
                          reinterpret_cast<float*>(scales), rows, n, m, mp, p, bits, in_dtype,
                          variant, ratio, inv_sqrt_n, device, stream);
}
#endif

}  // namespace
}  // namespace cbq

PYBIND11_MODULE(_C, m) {
  using namespace cbq;
  m.doc() = "cbq packed int2/int4/int8 storage kernels (see csrc/include/cbq/format.h)";
  m.def("format_version", [] { return kFormatVersion; });
  m.def("codes_per_word", [](int bits) {
    check_bits(bits);
    return codes_per_word(bits);
  });
#ifdef CBQ_WITH_CUDA
  m.def("has_cuda", [] { return true; });
  m.attr("cuda_archs") = CBQ_CUDA_ARCHS_STR;
#else
  m.def("has_cuda", [] { return false; });
  m.attr("cuda_archs") = "";
#endif
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("pack_cpu", &py_pack_cpu, release);
  m.def("unpack_cpu", &py_unpack_cpu, release);
  m.def("dequantize_cpu", &py_dequantize_cpu, release);
#ifdef CBQ_WITH_CUDA
  m.def("pack_cuda", &py_pack_cuda, release);
  m.def("unpack_cuda", &py_unpack_cuda, release);
  m.def("dequantize_cuda", &py_dequantize_cuda, release);
  m.def("gemm_decode_cuda", &py_gemm_decode_cuda, release);
  m.def("decode_tile_n", [](int bits) { return decode_tile_n(bits); });
  m.def("decode_chunk_k", [](int bits) { return decode_chunk_k(bits); });
  m.def("decode_max_m", [] { return decode_max_m(); });
  m.def("decode_ws_rows", [](int m) { return decode_ws_rows(m); });
  m.def("hadamard_quant_cuda", &py_hadamard_quant_cuda, release);
  m.def("hadamard_quant_reg_cuda", &py_hadamard_quant_reg_cuda, release);
  m.def("hadamard_quant_reg_smem_bytes", [](int64_t n, int64_t m, int64_t p, int bits,
                                            int in_dtype, int variant) {
    return hadamard_quant_reg_smem_bytes(n, m, p, bits, in_dtype, variant);
  });
  m.def("hadamard_quant_smem_bytes",
        [](int64_t n, int64_t m, int64_t mp, int64_t p, int in_dtype, bool mma) {
          return hadamard_quant_smem_bytes(n, m, mp, p, in_dtype, mma);
        });
#endif
}
