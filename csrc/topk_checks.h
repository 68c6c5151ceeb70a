// Input checks of pytrain::topk_filter, shared by csrc/cpu/topk.cpp and csrc/cuda/topk.cu
// (contract: pytrain/testing/compress_ref.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "tensor_checks.h"

namespace pytrain {

// x: float32 / bfloat16 / float16 on a device of type `device`, dense and contiguous; threshold not NaN.
inline void check_topk_args(const at::Tensor& x, double threshold, c10::DeviceType device) {
  constexpr const char* op = "topk_filter";
  check_kernel_device(op, "x", x, device);
  check_float_dtype(op, "x", x.scalar_type(), device);
  TORCH_CHECK(!std::isnan(threshold), op, ": threshold is NaN");
  check_dense_contiguous(op, "x", x);
}

}  // namespace pytrain
