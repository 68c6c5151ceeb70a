// Input checks of pytrain::adamw_step, shared by csrc/cpu/adamw.cpp and csrc/cuda/adamw.cu
// (contract: pytrain/testing/optim_ref.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "multi_tensor_checks.h"

namespace pytrain {

// Params and grads of one float dtype on one device of type `device`; states like the params, float32 or
// bfloat16, or int8 m / uint8 sqrt(v) codes with float32 block scales (then no amsgrad); float32 masters.
inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
                             at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList steps,
                             bool amsgrad, c10::DeviceType device_type) {
  constexpr const char* op = "adamw_step";
  check_params_grads(op, params, grads, device_type);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  check_like_params(op, "exp_avgs", params, exp_avgs, false);
  check_like_params(op, "exp_avg_sqs", params, exp_avg_sqs, false);
  check_like_params(op, "max_exp_avg_sqs", params, max_exp_avg_sqs, true);
  check_like_params(op, "master_params", params, master_params, true);
  check_list(op, "master_params", master_params, device, at::kFloat);
  TORCH_CHECK(amsgrad != max_exp_avg_sqs.empty(), op, ": amsgrad=", amsgrad, " but max_exp_avg_sqs has ",
              max_exp_avg_sqs.size(), " tensors (amsgrad needs one per param, otherwise none)");
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(), " tensors, expected ",
              params.size(), " (one per param)");
  if (!exp_avg_scales.empty()) {
    TORCH_CHECK(!amsgrad, op, ": amsgrad is not supported with int8 states");
    check_list(op, "exp_avgs", exp_avgs, device, at::kChar);
    check_list(op, "exp_avg_sqs", exp_avg_sqs, device, at::kByte);
    check_block_scales(op, "exp_avg_scales", params, exp_avg_scales);
    check_block_scales(op, "exp_avg_sq_scales", params, exp_avg_sq_scales);
    return;
  }
  TORCH_CHECK(exp_avg_sq_scales.empty(), op, ": exp_avg_sq_scales given without exp_avg_scales");
  const at::ScalarType state = exp_avgs[0].scalar_type();
  TORCH_CHECK(state == at::kFloat || state == at::kBFloat16, op, ": exp_avgs have dtype ", state,
              "; states must be float32 or bfloat16 (or int8 with block scales)");
  check_list(op, "exp_avgs", exp_avgs, device, state);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, device, state);
  check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, device, state);
}

// The step number of each param, read on the host from `steps` (one-element real CPU tensors, as torch.optim's
// state["step"]; a tensor so torch.compile captures it without reading it), each checked to be >= 1.
inline std::vector<double> read_adamw_steps(at::TensorList steps) {
  constexpr const char* op = "adamw_step";
  std::vector<double> counts;
  counts.reserve(steps.size());
  for (const at::Tensor& t : steps) {
    TORCH_CHECK(t.numel() == 1 && t.device().is_cpu() && !t.is_complex(), op,
                ": each step must be a one-element real CPU tensor, got shape ", t.sizes(), ", dtype ",
                t.scalar_type(), " on ", t.device());
    const double step = t.item<double>();
    TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count after increment), got ", step);
    counts.push_back(step);
  }
  return counts;
}

}  // namespace pytrain
