// Input checks of pytrain::lamb_step, shared by csrc/cpu/lamb.cpp and csrc/cuda/lamb.cu
// (contract: pytrain/testing/optim_ref.py).
#pragma once

#include <ATen/core/Tensor.h>

#include "multi_tensor_checks.h"

namespace pytrain {

// Params and grads of one float dtype on one device of type `device`; exp_avgs and exp_avg_sqs like the params.
inline void check_lamb_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, c10::DeviceType device_type) {
  constexpr const char* op = "lamb_step";
  check_params_grads(op, params, grads, device_type);
  if (params.empty()) return;
  check_like_params(op, "exp_avgs", params, exp_avgs, false);
  check_like_params(op, "exp_avg_sqs", params, exp_avg_sqs, false);
  check_list(op, "exp_avgs", exp_avgs, params[0].device(), params[0].scalar_type());
  check_list(op, "exp_avg_sqs", exp_avg_sqs, params[0].device(), params[0].scalar_type());
}

}  // namespace pytrain
