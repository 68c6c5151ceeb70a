// Input checks of pytrain::quantize / pytrain::dequantize, shared by csrc/cpu/quantize.cpp and
// csrc/cuda/quantize.cu (contract: pytrain/testing/quant_ref.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

#include "quantize_format.h"
#include "tensor_checks.h"

namespace pytrain::quant {

inline Format parse_format(std::string_view fmt) {
  if (fmt == "int8") return kInt8;
  if (fmt == "fp8_e4m3") return kE4M3;
  TORCH_CHECK(fmt == "fp8_e5m2", "quantize: unknown format '", fmt, "' (expected int8, fp8_e4m3 or fp8_e5m2)");
  return kE5M2;
}

// x: float32 / bfloat16 / float16 on a device of type `device`, contiguous; group_size >= 1; stochastic
// rounding only for int8; seed >= 0.  Returns the format named by fmt_name.
inline Format check_quantize_args(const at::Tensor& x, std::string_view fmt_name, int64_t group_size, bool stochastic,
                                  int64_t seed, c10::DeviceType device) {
  const Format fmt = parse_format(fmt_name);
  check_kernel_device("quantize", "x", x, device);
  check_float_dtype("quantize", "x", x.scalar_type(), device);
  TORCH_CHECK(x.is_contiguous(), "quantize: x must be contiguous (shape ", x.sizes(), ", strides ", x.strides(), ")");
  TORCH_CHECK(group_size >= 1, "quantize: group_size must be >= 1, got ", group_size);
  TORCH_CHECK(!stochastic || fmt == kInt8, "quantize: stochastic rounding is defined for int8 only");
  TORCH_CHECK(seed >= 0, "quantize: seed must be >= 0, got ", seed);
  return fmt;
}

// data: int8 / float8 codes; scales: one float32 per group, on data's device; both contiguous; data on a
// device of type `device`; output dtype float32 / bfloat16 / float16.  Returns data's format.
inline Format check_dequantize_args(const at::Tensor& data, const at::Tensor& scales, int64_t group_size,
                                    at::ScalarType dtype, c10::DeviceType device) {
  const at::ScalarType code = data.scalar_type();
  TORCH_CHECK(code == at::kChar || code == at::kFloat8_e4m3fn || code == at::kFloat8_e5m2, "dequantize: data has dtype ",
              code, "; expected int8, float8_e4m3fn or float8_e5m2");
  TORCH_CHECK(group_size >= 1, "dequantize: group_size must be >= 1, got ", group_size);
  const int64_t groups = num_groups(data.numel(), group_size);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == groups, "dequantize: scales must be ", groups,
              " float32 values (one per group of ", group_size, "), got ", scales.numel(), " ", scales.scalar_type());
  TORCH_CHECK(scales.device() == data.device(), "dequantize: scales are on ", scales.device(), ", data on ",
              data.device());
  TORCH_CHECK(data.is_contiguous() && scales.is_contiguous(), "dequantize: data and scales must be contiguous");
  check_kernel_device("dequantize", "data", data, device);
  check_float_dtype("dequantize", "outputs", dtype, device);
  return code == at::kChar ? kInt8 : code == at::kFloat8_e4m3fn ? kE4M3 : kE5M2;
}

}  // namespace pytrain::quant
