// Input checks of the PowerSGD kernels, shared by csrc/cpu/powersgd.cpp and csrc/cuda/powersgd.cu.
// Each message names the op and argument and says what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#include "tensor_checks.h"

namespace pytrain {

// A dense, contiguous, non-empty 2-D or 3-D float32 tensor on a device of type `device`.
inline void check_powersgd_operand(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  check_kernel_device(op, name, t, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " has dtype ", t.scalar_type(), "; the ",
              c10::DeviceTypeName(device), " kernel supports float32");
  check_dense_contiguous(op, name, t);
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be 2-D or 3-D, got shape ", t.sizes());
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " is empty (shape ", t.sizes(), ")");
}

// M (b, n, m) or (n, m) and a factor F whose rows match M's dim `dim` (-1 for Q, -2 for P), on one device;
// returns both as 3-D (batched) views.
inline std::pair<at::Tensor, at::Tensor> check_powersgd_pair(const char* op, const at::Tensor& M, const char* name,
                                                             const at::Tensor& F, int64_t dim,
                                                             c10::DeviceType device) {
  check_powersgd_operand(op, "M", M, device);
  check_powersgd_operand(op, name, F, device);
  TORCH_CHECK(M.device() == F.device(), op, ": M is on ", M.device(), ", ", name, " on ", F.device());
  TORCH_CHECK(M.dim() == F.dim() && (M.dim() == 2 || M.size(0) == F.size(0)) && F.size(-2) == M.size(dim), op,
              ": shapes M ", M.sizes(), " and ", name, " ", F.sizes(), " do not match");
  return {M.dim() == 3 ? M : M.unsqueeze(0), F.dim() == 3 ? F : F.unsqueeze(0)};
}

// The P of orthogonalize: an operand with no more columns than rows; returns it as a 3-D (batched) view.
inline at::Tensor check_orthogonalize_operand(const at::Tensor& P, c10::DeviceType device) {
  check_powersgd_operand("orthogonalize", "P", P, device);
  TORCH_CHECK(P.size(-1) <= P.size(-2), "orthogonalize: P ", P.sizes(), " has more columns than rows");
  return P.dim() == 3 ? P : P.unsqueeze(0);
}

}  // namespace pytrain
