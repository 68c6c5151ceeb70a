// Input checks of pytrain::linear_distillation_loss (contract: pytrain/ops/linear_distillation_loss.py), shared by
// csrc/cpu/linear_distillation_loss.cpp and csrc/cuda/linear_distillation_loss.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <string_view>
#include <utility>

#include "tensor_checks.h"

namespace pytrain {

enum class DistillKind { kKL, kReverseKL, kJSD };

inline DistillKind parse_distill_kind(std::string_view kind) {
  if (kind == "kl") return DistillKind::kKL;
  if (kind == "reverse_kl") return DistillKind::kReverseKL;
  TORCH_CHECK(kind == "jsd", "linear_distillation_loss: kind must be 'kl', 'reverse_kl' or 'jsd', got '",
              std::string(kind), "'");
  return DistillKind::kJSD;
}

// The four float tensors: one float dtype, dense, contiguous, 2-D, on `device`, agreeing in N, V and each side's H
// (V > 0); target (N,) int64; grad_scale (N,) float32; options in range.  On the CPU also every target in [0, V)
// or ignore_index (on CUDA that would cost a device sync: the kernel gives a bad target's token a NaN loss and
// gradient row instead, as the Triton kernel does).
inline void check_linear_distillation_loss_args(const at::Tensor& sh, const at::Tensor& sw, const at::Tensor& th,
                                                const at::Tensor& tw, const c10::optional<at::Tensor>& target,
                                                const c10::optional<at::Tensor>& grad_scale, DistillKind kind,
                                                double temperature, double beta, double hard, int64_t ignore_index,
                                                int64_t chunk, c10::DeviceType device) {
  constexpr const char* op = "linear_distillation_loss";
  const std::pair<const char*, const at::Tensor*> floats[] = {
      {"student_hidden", &sh}, {"student_weight", &sw}, {"teacher_hidden", &th}, {"teacher_weight", &tw}};
  for (const auto& [name, x] : floats) {
    check_kernel_device(op, name, *x, device);
    check_dense_contiguous(op, name, *x);
    TORCH_CHECK(x->scalar_type() == sh.scalar_type(), op, ": ", name, " has dtype ", x->scalar_type(),
                ", student_hidden ", sh.scalar_type(), "; they must match");
    TORCH_CHECK(x->dim() == 2, op, ": ", name, " must be 2-D, got ", x->sizes());
  }
  check_float_dtype(op, "student_hidden", sh.scalar_type(), device);
  TORCH_CHECK(sh.size(1) == sw.size(1) && th.size(1) == tw.size(1), op,
              ": student_hidden (N, Hs) / student_weight (V, Hs) and teacher_hidden (N, Ht) / teacher_weight "
              "(V, Ht) must agree in H, got ", sh.sizes(), ", ", sw.sizes(), ", ", th.sizes(), ", ", tw.sizes());
  TORCH_CHECK(sh.size(0) == th.size(0) && sw.size(0) == tw.size(0) && sw.size(0) > 0, op,
              ": student and teacher must share N and V > 0, got ", sh.sizes(), ", ", sw.sizes(), ", ", th.sizes(),
              ", ", tw.sizes());
  const int64_t N = sh.size(0), V = sw.size(0);
  if (target.has_value()) {
    check_kernel_device(op, "target", *target, device);
    check_dense_contiguous(op, "target", *target);
    TORCH_CHECK(target->scalar_type() == at::kLong && target->dim() == 1 && target->size(0) == N, op,
                ": target must be (N,) = (", N, ",) int64, got ", target->sizes(), " ", target->scalar_type());
    if (device == c10::DeviceType::CPU) {
      const int64_t* t = target->data_ptr<int64_t>();
      for (int64_t i = 0; i < N; ++i) {
        TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), op, ": target[", i, "] = ", t[i],
                    " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
      }
    }
  }
  if (grad_scale.has_value()) {
    check_kernel_device(op, "grad_scale", *grad_scale, device);
    check_dense_contiguous(op, "grad_scale", *grad_scale);
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->dim() == 1 && grad_scale->size(0) == N, op,
                ": grad_scale must be (N,) = (", N, ",) float32, got ", grad_scale->sizes(), " ",
                grad_scale->scalar_type());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(kind != DistillKind::kJSD || (beta > 0.0 && beta < 1.0), op, ": beta must be in (0, 1) for 'jsd', got ",
              beta);
  TORCH_CHECK(hard >= 0.0 && hard <= 1.0, op, ": hard_label_weight must be in [0, 1], got ", hard);
  TORCH_CHECK(hard == 0.0 || target.has_value(), op, ": hard_label_weight > 0 needs a target");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
}

}  // namespace pytrain
