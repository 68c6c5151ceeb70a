// Checks of single tensors shared by the entry points of every op (CPU and CUDA alike).
// Each message names the op and argument and says what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace pytrain {

// `t` is on a device of type `device`, the kind the kernel that got it serves.
inline void check_kernel_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": the ", c10::DeviceTypeName(device), " kernel got ", name, " on ",
              t.device());
}

// Only float32, bfloat16 and float16 tensors are served by the float kernels.
inline void check_float_dtype(const char* op, const char* name, at::ScalarType dtype, c10::DeviceType device) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name, " have dtype ",
              dtype, "; the ", c10::DeviceTypeName(device), " kernel supports float32, bfloat16 and float16");
}

// `t` is a dense, contiguous tensor.
inline void check_dense_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided && t.is_contiguous(), op, ": ", name, " must be dense and contiguous (shape ",
              t.sizes(), ", strides ", t.strides(), ")");
}

}  // namespace pytrain
