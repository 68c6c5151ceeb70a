// Input checks of pytrain::quantize / pytrain::dequantize, shared by csrc/cpu/quantize.cpp and
// csrc/cuda/quantize.cu (contract: pytrain/testing/quant_ref.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
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

// An output / in-out tensor of an *_into op: `numel` elements of `dtype` on `device`, dense and contiguous.
inline void check_written(const char* op, const char* name, const at::Tensor& t, int64_t numel, at::ScalarType dtype,
                          const c10::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), "; expected ", dtype);
  TORCH_CHECK(t.numel() == numel && t.device() == device, op, ": ", name, " must hold ", numel, " elements on ",
              device, ", got ", t.sizes(), " on ", t.device());
  check_dense_contiguous(op, name, t);
}

// quantize_into: x as for quantize (no stochastic rounding); data / scales its outputs; residual, if given,
// float32 of x's numel.  Returns the format.
inline Format check_quantize_into_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                       const at::Tensor& data, const at::Tensor& scales, std::string_view fmt_name,
                                       int64_t group_size, c10::DeviceType device) {
  const Format fmt = check_quantize_args(x, fmt_name, group_size, false, 0, device);
  if (residual.has_value()) check_written("quantize_into", "residual", *residual, x.numel(), at::kFloat, x.device());
  check_written("quantize_into", "data", data, x.numel(), code_dtype(fmt), x.device());
  check_written("quantize_into", "scales", scales, num_groups(x.numel(), group_size), at::kFloat, x.device());
  return fmt;
}

// A (rows >= 1, n) tensor whose rows are contiguous (any row stride).
inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided && t.dim() == 2 && t.size(0) >= 1 && (t.size(1) <= 1 || t.stride(1) == 1),
              op, ": ", name, " must be (rows >= 1, n) with contiguous rows, got shape ", t.sizes(), " strides ",
              t.strides());
}

// requantize_mean: data (W, C) codes, scales (W, G) float32, rows contiguous; out_data (C,) codes, out_scales
// (G,) float32, residual (m <= C,) float32, contiguous, on data's device.  Returns the format.
inline Format check_requantize_mean_args(const at::Tensor& data, const at::Tensor& scales, const at::Tensor& out_data,
                                         const at::Tensor& out_scales, const std::optional<at::Tensor>& residual,
                                         int64_t group_size, c10::DeviceType device) {
  constexpr const char* op = "requantize_mean";
  const at::ScalarType code = data.scalar_type();
  TORCH_CHECK(code == at::kChar || code == at::kFloat8_e4m3fn || code == at::kFloat8_e5m2, op, ": data has dtype ",
              code, "; expected int8, float8_e4m3fn or float8_e5m2");
  TORCH_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  check_kernel_device(op, "data", data, device);
  check_rows(op, "data", data);
  check_rows(op, "scales", scales);
  const int64_t n = data.size(1), groups = num_groups(n, group_size);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.size(0) == data.size(0) && scales.size(1) == groups &&
                  scales.device() == data.device(),
              op, ": scales must be (", data.size(0), ", ", groups, ") float32 on ", data.device(), ", got ",
              scales.sizes(), " ", scales.scalar_type(), " on ", scales.device());
  check_written(op, "out_data", out_data, n, code, data.device());
  check_written(op, "out_scales", out_scales, groups, at::kFloat, data.device());
  if (residual.has_value()) {
    TORCH_CHECK(residual->numel() <= n, op, ": residual has ", residual->numel(), " elements, more than a row's ", n);
    check_written(op, "residual", *residual, residual->numel(), at::kFloat, data.device());
  }
  return code == at::kChar ? kInt8 : code == at::kFloat8_e4m3fn ? kE4M3 : kE5M2;
}

}  // namespace pytrain::quant
