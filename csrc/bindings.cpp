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
#endif
}
