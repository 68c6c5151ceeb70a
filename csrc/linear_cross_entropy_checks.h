// Input checks of pytrain::linear_cross_entropy (contract: pytrain/ops/linear_cross_entropy.py), shared by
// csrc/cpu/linear_cross_entropy.cpp and csrc/cuda/linear_cross_entropy.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "tensor_checks.h"

namespace pytrain {

// hidden (N, H), weight (V, H), bias (V,): one float dtype, dense, contiguous, on `device`; target (N,) int64;
// grad_scale (N,) float32; options in range.  On the CPU also every target in [0, V) or ignore_index (on CUDA that
// would cost a device sync: the kernel gives a bad target's token a NaN loss and gradient row instead, as the
// Triton kernel does).
inline void check_linear_cross_entropy_args(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& target, const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                                            double label_smoothing, double z_loss, double softcap, int64_t chunk,
                                            c10::DeviceType device) {
  constexpr const char* op = "linear_cross_entropy";
  check_kernel_device(op, "hidden", hidden, device);
  check_kernel_device(op, "weight", weight, device);
  check_kernel_device(op, "target", target, device);
  check_float_dtype(op, "hidden", hidden.scalar_type(), device);
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              ", hidden ", hidden.scalar_type(), "; they must match");
  check_dense_contiguous(op, "hidden", hidden);
  check_dense_contiguous(op, "weight", weight);
  check_dense_contiguous(op, "target", target);
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
              ": hidden must be (N, H) and weight (V, H), got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight has V = 0 rows");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == hidden.size(0), op,
              ": target must be (N,) = (", hidden.size(0), ",) int64, got ", target.sizes(), " ",
              target.scalar_type());
  if (bias.has_value()) {
    check_kernel_device(op, "bias", *bias, device);
    check_dense_contiguous(op, "bias", *bias);
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->dim() == 1 && bias->size(0) == weight.size(0),
                op, ": bias must be (V,) = (", weight.size(0), ",) ", hidden.scalar_type(), ", got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  if (grad_scale.has_value()) {
    check_kernel_device(op, "grad_scale", *grad_scale, device);
    check_dense_contiguous(op, "grad_scale", *grad_scale);
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->dim() == 1 &&
                    grad_scale->size(0) == hidden.size(0),
                op, ": grad_scale must be (N,) = (", hidden.size(0), ",) float32, got ", grad_scale->sizes(), " ",
                grad_scale->scalar_type());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss), op, ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  if (device == c10::DeviceType::CPU) {
    const int64_t* t = target.data_ptr<int64_t>();
    const int64_t vocab = weight.size(0);
    for (int64_t i = 0; i < target.size(0); ++i) {
      TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab), op, ": target[", i, "] = ", t[i],
                  " is outside [0, ", vocab, ") and is not ignore_index (", ignore_index, ")");
    }
  }
}

}  // namespace pytrain
