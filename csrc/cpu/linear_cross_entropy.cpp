// pytrain::linear_cross_entropy for CPU tensors: the loss of a language-model head and its gradients, chunk by
// chunk of tokens, never holding the (N, V) logits.  Contract and maths: pytrain/ops/linear_cross_entropy.py.
//
// The chunk walk (logits GEMM, then the gradient GEMMs) is csrc/linear_chunks.h's.  Per chunk, one fused
// pass per row (rows spread over threads with at::parallel_for, 16-lane SIMD within a row, compiled for
// AVX-512 / AVX2 / baseline by PYTRAIN_SIMD) adds the bias, applies the softcap, takes the row max and sum of
// z, then sum exp(z - max) (the log-sum-exp), the loss, and, when gradients are wanted, overwrites the row
// with dx = g * (softmax - smoothed one-hot, z-loss and tanh' included); grad_bias += column sums of dx
// (float32).  Extra memory: O(chunk x V + V x H) (csrc/linear_chunks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "cpu/linear_chunks.h"
#include "cpu/multi_tensor.h"  // PYTRAIN_SIMD
#include "linear_cross_entropy_checks.h"

namespace pytrain::cpu {
namespace {

struct Options {
  float eps;    // label smoothing
  float zl;     // z-loss weight
  float cap;    // softcap (0: none)
  int64_t ignore_index;
};

// One token's row x (V floats, in place).  Returns its loss; with `grad` the row becomes dx scaled by g.
// Ignored rows: loss 0, dx 0.
PYTRAIN_SIMD float row_pass(float* __restrict z, int64_t V, const float* __restrict bias, int64_t t,
                            const Options& o, float g, bool grad) {
  if (t == o.ignore_index) {
    if (grad) std::memset(z, 0, sizeof(float) * V);
    return 0.0f;
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  vf vmax = splat(ninf), vsum = splat(0.0f);
  for (int64_t j = 0; j < V; j += kLanes) {  // bias, softcap, max and sum of z
    const int64_t n = V - j;
    vf x = load_part(z + j, n, 0.0f);
    if (bias) x += load_part(bias + j, n, 0.0f);
    if (o.cap > 0.0f) x = o.cap * (1.0f - 2.0f / (exp_v(x * (2.0f / o.cap)) + 1.0f));  // cap * tanh(x / cap)
    store_part(z + j, n, x);
    vsum += x;  // padded lanes are 0 (tanh(0) = 0)
    if (n < kLanes) {
      for (int64_t i = n; i < kLanes; ++i) x[i] = ninf;
    }
    vmax = x > vmax ? x : vmax;
  }
  float m = ninf, sum_z = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) {
    m = std::max(m, vmax[i]);
    sum_z += vsum[i];
  }
  vf vs = splat(0.0f);
  for (int64_t j = 0; j < V; j += kLanes) vs += exp_v(load_part(z + j, V - j, ninf) - m);
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += vs[i];
  const float lse = m + std::log(s);
  const float zt = z[t];
  const float loss = lse - (1.0f - o.eps) * zt - o.eps / static_cast<float>(V) * sum_z + o.zl * lse * lse;
  if (grad) {
    const float a = g * (1.0f + 2.0f * o.zl * lse), b = g * o.eps / static_cast<float>(V);
    const float inv_cap = o.cap > 0.0f ? 1.0f / o.cap : 0.0f;
    for (int64_t j = 0; j < V; j += kLanes) {
      const int64_t n = V - j;
      const vf zz = load_part(z + j, n, ninf);
      vf d = a * exp_v(zz - lse) - b;
      if (o.cap > 0.0f) {
        const vf r = zz * inv_cap;
        d *= 1.0f - r * r;
      }
      store_part(z + j, n, d);
    }
    const float rt = zt * inv_cap;
    z[t] -= g * (1.0f - o.eps) * (1.0f - rt * rt);
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, int64_t chunk) {
  check_linear_cross_entropy_args(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, z_loss,
                                  softcap, chunk, c10::DeviceType::CPU);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool grad = grad_scale.has_value();
  const Options o{static_cast<float>(label_smoothing), static_cast<float>(z_loss), static_cast<float>(softcap),
                  ignore_index};
  const auto f32_opts = hidden.options().dtype(at::kFloat);
  at::Tensor losses = at::empty({N}, f32_opts);
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor gb_acc = grad && bias.has_value() ? at::zeros({V}, f32_opts) : at::Tensor();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const float* scale = grad ? grad_scale->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  float* loss_out = losses.data_ptr<float>();

  LinearGrads g = walk_linear_chunks(hidden, weight, chunk, grad, [&](int64_t r0, int64_t c, at::Tensor& x) {
    float* xp = x.data_ptr<float>();
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        loss_out[r0 + i] = row_pass(xp + i * V, V, b, tgt[r0 + i], o, grad ? scale[r0 + i] : 0.0f, grad);
      }
    });
    if (grad && b) gb_acc.add_(x.sum(0));
  });
  if (!grad) return {losses, g.grad_hidden, weight.new_empty({0}), hidden.new_empty({0})};
  at::Tensor grad_bias = bias.has_value() ? gb_acc.to(bias->scalar_type()) : hidden.new_empty({0});
  return {losses, g.grad_hidden, g.grad_weight_acc.to(weight.scalar_type()), grad_bias};
}

}  // namespace
}  // namespace pytrain::cpu

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("linear_cross_entropy", &pytrain::cpu::linear_cross_entropy); }
