// Host-side dispatch of the CUDA kernels: a runtime dtype or flag turned into a template argument.  The entry
// points check dtypes first (csrc/<op>_checks.h); the failure here is the backstop of an unlisted dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <string>
#include <type_traits>

namespace pytrain::cuda {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(t);
  }
}

// Calls f(T{}) for the T of Ts whose dtype is t; otherwise fails naming the op, the argument and Ts.
template <class... Ts, class F>
void dispatch_dtype(at::ScalarType t, const char* op, const char* what, F&& f) {
  const bool found = ((c10::CppTypeToScalarType<Ts>::value == t ? (f(Ts{}), true) : false) || ...);
  if (!found) {
    const std::string names[] = {dtype_name(c10::CppTypeToScalarType<Ts>::value)...};
    std::string supported = names[0];
    for (size_t i = 1; i < sizeof...(Ts); ++i) supported += (i + 1 < sizeof...(Ts) ? ", " : " and ") + names[i];
    TORCH_CHECK(false, op, ": ", what, " have dtype ", t, "; the CUDA kernel supports ", supported);
  }
}

// The float dtypes every float kernel serves: f(float{}), f(c10::BFloat16{}) or f(c10::Half{}).
template <class F>
void dispatch_float_dtype(at::ScalarType t, const char* op, const char* what, F&& f) {
  dispatch_dtype<float, c10::BFloat16, c10::Half>(t, op, what, f);
}

// Calls f(std::true_type{}) or f(std::false_type{}), turning a runtime flag into a template argument.
template <class F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace pytrain::cuda
