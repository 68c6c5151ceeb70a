// Input checks of pytrain::attention_fwd / attention_bwd (contract: pytrain/testing/attention_ref.py), for
// csrc/cpu/attention.cpp; a C++ CUDA twin would share them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "tensor_checks.h"

namespace pytrain {

// q (B, H, Lq, D), k and v (B, Hkv, Lk, D): dense, contiguous, 4-D CPU tensors of one float dtype, H a
// multiple of Hkv, D in [16, 256].
inline void check_attention_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    check_kernel_device(op, name, t, c10::DeviceType::CPU);
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", t.layout());
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (batch, heads, seqlen, headdim), got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
                t.strides(), ")");
  }
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k, v must share a dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  check_float_dtype(op, "q, k, v", dt, c10::DeviceType::CPU);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), op, ": batch sizes differ: q has ", q.size(0), ", k/v have ", k.size(0));
  TORCH_CHECK(q.size(3) == k.size(3), op, ": head dims differ: q has ", q.size(3), ", k/v have ", k.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ") (GQA/MQA)");
  TORCH_CHECK(q.size(3) >= 16 && q.size(3) <= 256, op, ": head dim ", q.size(3), " out of range [16, 256]");
}

// A further operand (grad_out, out, lse): on q's device, dense and contiguous, of the given dtype and shape.
inline void check_attention_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                                 at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  check_dense_contiguous(op, name, t);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
}

// Window sides >= 0 or -1 (unbounded), dropout_p in [0, 1), a finite scale.
inline void check_attention_args(const char* op, double scale, int64_t window_left, int64_t window_right,
                                 double dropout_p) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window sides must be >= 0 or -1 (unbounded), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// The dropout seed: a one-element integer CPU tensor (torch.compile draws it in the graph), read on the host.
inline int64_t read_attention_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.device().is_cpu() && !at::isFloatingType(seed.scalar_type()) &&
                  !at::isComplexType(seed.scalar_type()) && seed.scalar_type() != at::kBool,
              op, ": seed must be a one-element integer CPU tensor, got shape ", seed.sizes(), ", dtype ",
              seed.scalar_type(), " on ", seed.device());
  return seed.item<int64_t>();
}

}  // namespace pytrain
