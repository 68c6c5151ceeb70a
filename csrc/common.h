// Input checks shared by every C++ and CUDA entry point of pytrain.
// Each message says what was expected and what came, naming the op and argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace pytrain {

// All tensors of `list` are dense, contiguous, on `device`, of dtype `dtype` (if given).
inline void check_list(const char* op, const char* name, at::TensorList list, const c10::Device& device,
                       c10::optional<at::ScalarType> dtype = c10::nullopt) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] must be a dense tensor, got layout ", t.layout());
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but the params are on ", device);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous (shape ", t.sizes(), ", strides ",
                t.strides(), ")");
    if (dtype) {
      TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
                  *dtype);
    }
  }
}

// `list` is empty or has one tensor per param, each with as many elements as that param.
inline void check_like_params(const char* op, const char* name, at::TensorList params, at::TensorList list,
                              bool may_be_empty) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(), " tensors, expected ",
              params.size(), " (one per param)");
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", list[i].numel(),
                " elements, params[", i, "] has ", params[i].numel());
  }
}

// Number of 256-element blocks of the int8 optimizer states for a tensor of n elements.
constexpr int64_t kInt8Block = 256;
inline int64_t int8_blocks(int64_t n) { return (n + kInt8Block - 1) / kInt8Block; }

// `scales` has one float32 tensor of int8_blocks(numel) elements per param, on the params' device.
inline void check_block_scales(const char* op, const char* name, at::TensorList params, at::TensorList scales) {
  TORCH_CHECK(scales.size() == params.size(), op, ": ", name, " has ", scales.size(), " tensors, expected ",
              params.size(), " (one per param)");
  if (params.empty()) return;
  check_list(op, name, scales, params[0].device(), at::kFloat);
  for (size_t i = 0; i < scales.size(); ++i) {
    TORCH_CHECK(scales[i].numel() == int8_blocks(params[i].numel()), op, ": ", name, "[", i, "] has ",
                scales[i].numel(), " elements, expected ", int8_blocks(params[i].numel()), " (one per ", kInt8Block,
                "-element block of params[", i, "])");
  }
}

}  // namespace pytrain
