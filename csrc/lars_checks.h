// Input checks of pytrain::lars_step, shared by csrc/cpu/lars.cpp and csrc/cuda/lars.cu
// (contract: pytrain/testing/optim_ref.py).
#pragma once

#include <ATen/core/Tensor.h>

#include "multi_tensor_checks.h"

namespace pytrain {

// Params and grads of one float dtype on one device of type `device`; one momentum buffer per param, like it
// (none needed when momentum is 0).
inline void check_lars_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            double momentum, c10::DeviceType device_type) {
  constexpr const char* op = "lars_step";
  check_params_grads(op, params, grads, device_type);
  if (params.empty()) return;
  check_like_params(op, "momentum_buffers", params, momentum_buffers, /*may_be_empty=*/momentum == 0.0);
  check_list(op, "momentum_buffers", momentum_buffers, params[0].device(), params[0].scalar_type());
}

}  // namespace pytrain
