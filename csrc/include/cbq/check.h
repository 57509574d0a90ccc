// Argument checks of the binding layer. The Python wrappers validate everything first and
// raise precise errors; these checks are the second line, so that no call that slipped past
// them (a direct call of cbq_kernels._C) can read or write out of bounds. They throw
// std::invalid_argument, which pybind11 turns into ValueError.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cbq/format.h"

namespace cbq {

template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

#define CBQ_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) ::cbq::fail("cbq_kernels._C: ", __func__, ": ", __VA_ARGS__);   \
  } while (0)

inline void check_bits(int bits) {
  CBQ_CHECK(is_supported_bits(bits), "bits must be 2, 3, 4 or 8, got ", bits);
}

inline void check_sizes(int64_t n, int64_t k) {
  CBQ_CHECK(n >= 0 && k >= 0, "sizes must be non-negative, got n=", n, " k=", k);
  CBQ_CHECK(k == 0 || n <= (int64_t{1} << 62) / k, "n*k overflows: n=", n, " k=", k);
}

inline void check_ptr(std::uintptr_t p, int64_t numel, const char* name) {
  CBQ_CHECK(numel == 0 || p != 0, name, " is a null pointer for ", numel, " elements");
}

inline void check_group(int64_t group_size) {
  CBQ_CHECK(group_size > 0, "group_size must be positive, got ", group_size);
}

inline DType check_dtype(int code) {
  CBQ_CHECK(code >= 0 && code <= 2, "unknown output dtype code ", code);
  return static_cast<DType>(code);
}

}  // namespace cbq
