// Checks of tensor lists shared by the C++ and CUDA entry points of the multi-tensor ops (adamw_step,
// lars_step, lamb_step, global_norm); op-specific rules live in <op>_checks.h.
// Each message says what was expected and what came, naming the op and argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "int8_states.h"
#include "tensor_checks.h"

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

// A non-empty list of tensors on one device of type `device`, of one float dtype, contiguous.
inline void check_float_tensors(const char* op, const char* name, at::TensorList list, c10::DeviceType device) {
  check_kernel_device(op, name, list[0], device);
  check_float_dtype(op, name, list[0].scalar_type(), device);
  check_list(op, name, list, list[0].device(), list[0].scalar_type());
}

// Params and grads: one grad per param, all on one device of type `device`, of one float dtype, contiguous.
inline void check_params_grads(const char* op, at::TensorList params, at::TensorList grads, c10::DeviceType device) {
  check_like_params(op, "grads", params, grads, /*may_be_empty=*/false);
  if (params.empty()) return;
  check_float_tensors(op, "params", params, device);
  check_list(op, "grads", grads, params[0].device(), params[0].scalar_type());
}

}  // namespace pytrain
