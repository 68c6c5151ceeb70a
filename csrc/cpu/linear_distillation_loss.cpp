// pytrain::linear_distillation_loss for CPU tensors: a student's head distilled from a teacher's (forward KL,
// reverse KL or generalised JSD at temperature T, optionally mixed with cross-entropy on hard labels) and the
// student's gradients, chunk by chunk of tokens, never holding either (N, V) logit matrix.  Contract and maths
// (with references): pytrain/ops/linear_distillation_loss.py.
//
// The chunk walk over the student (logits GEMM, then the gradient GEMMs) is csrc/linear_chunks.h's; inside it
// each chunk also gets the teacher's logits (at::mm, float32).  Then one fused pass per token row (rows spread over
// threads with at::parallel_for, 16-lane SIMD within a row, compiled for AVX-512 / AVX2 / baseline by
// PYTRAIN_SIMD), in four sweeps over the V columns:
//   A. row maxima of s and t;
//   B. sums of exp for log q = log_softmax(s / T), log p = log_softmax(t / T) (and log_softmax(s) for the hard
//      labels);
//   C. the divergence D, and into the teacher's row: p ("kl") or r = log q - log p ("reverse_kl") or
//      r = log q - log m ("jsd", log m = logaddexp(log b + log p, log(1 - b) + log q));
//   D. with gradients, the student's row becomes dloss/ds = g ((1 - a) T dD/du + a (softmax(s) - onehot)).
// Input checks: csrc/linear_distillation_loss_checks.h.  Extra memory: the two (chunk, V) float32 buffers plus
// csrc/linear_chunks.h's: O(chunk x V + V x Hs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>
#include <tuple>

#include "cpu/linear_chunks.h"
#include "cpu/multi_tensor.h"  // PYTRAIN_SIMD
#include "linear_distillation_loss_checks.h"

namespace pytrain::cpu {
namespace {

struct Options {
  DistillKind kind;
  float temperature;
  float beta;
  float hard;  // hard_label_weight
  int64_t ignore_index;
  bool has_target;
};

// log(1 + e) for e in [0, 1]: 2 atanh(y), y = e / (2 + e) in [0, 1/3], by its odd series to y^15 (truncation
// below 1.4e-8 relative; no cancellation for small e).
inline __attribute__((always_inline)) vf log1p_unit(vf e) {
  const vf y = e / (2.0f + e);
  const vf y2 = y * y;
  vf p = splat(1.0f / 15.0f);
  p = p * y2 + 1.0f / 13.0f;
  p = p * y2 + 1.0f / 11.0f;
  p = p * y2 + 1.0f / 9.0f;
  p = p * y2 + 1.0f / 7.0f;
  p = p * y2 + 1.0f / 5.0f;
  p = p * y2 + 1.0f / 3.0f;
  p = p * y2 + 1.0f;
  return 2.0f * y * p;
}

// One token: s (student logits, in place: becomes dloss/ds with `grad`), t (teacher logits, scratch), V floats.
// Returns the token's loss.  Ignored tokens: loss 0, ds 0.
PYTRAIN_SIMD float row_pass(float* __restrict s, float* __restrict t, int64_t V, int64_t target, const Options& o,
                            float g, bool grad) {
  if (o.has_target && target == o.ignore_index) {
    if (grad) std::memset(s, 0, sizeof(float) * V);
    return 0.0f;
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  const float inv_t = 1.0f / o.temperature;
  // A: maxima
  vf vms = splat(ninf), vmt = splat(ninf);
  for (int64_t j = 0; j < V; j += kLanes) {
    const vf x = load_part(s + j, V - j, ninf), y = load_part(t + j, V - j, ninf);
    vms = x > vms ? x : vms;
    vmt = y > vmt ? y : vmt;
  }
  float ms = ninf, mt = ninf;
  for (int64_t i = 0; i < kLanes; ++i) {
    ms = std::max(ms, vms[i]);
    mt = std::max(mt, vmt[i]);
  }
  // B: log-sum-exps of s / T, t / T (and s)
  const bool hard = o.hard > 0.0f;
  const float mu = ms * inv_t, mv = mt * inv_t;
  vf su = splat(0.0f), sv = splat(0.0f), s1 = splat(0.0f);
  for (int64_t j = 0; j < V; j += kLanes) {
    const vf x = load_part(s + j, V - j, ninf), y = load_part(t + j, V - j, ninf);
    su += exp_v(x * inv_t - mu);
    sv += exp_v(y * inv_t - mv);
    if (hard) s1 += exp_v(x - ms);
  }
  const float lse_u = mu + std::log(hsum(su)), lse_v = mv + std::log(hsum(sv));
  const float lse_s = hard ? ms + std::log(hsum(s1)) : 0.0f;
  // C: the divergence; the teacher's row becomes p or r
  const float lb = std::log(o.beta), l1b = std::log1p(-o.beta);
  vf vd = splat(0.0f), vc = splat(0.0f);  // D, and sum_j q_j r_j for "jsd"
  for (int64_t j = 0; j < V; j += kLanes) {
    const int64_t n = V - j;
    const vf lq = load_part(s + j, n, 0.0f) * inv_t - lse_u, lp = load_part(t + j, n, 0.0f) * inv_t - lse_v;
    const vf q = exp_v(lq), p = exp_v(lp);
    vf d, keep;
    if (o.kind == DistillKind::kKL) {
      d = p * (lp - lq);
      keep = p;
    } else if (o.kind == DistillKind::kReverseKL) {
      keep = lq - lp;
      d = q * keep;
    } else {
      const vf a = lp + lb, b = lq + l1b;
      const vf hi = a > b ? a : b, lo = a > b ? b : a;
      const vf lm = hi + log1p_unit(exp_v(lo - hi));
      keep = lq - lm;
      d = o.beta * p * (lp - lm) + (1.0f - o.beta) * q * keep;
      const vf c = q * keep;
      vc += n >= kLanes ? c : load_part(reinterpret_cast<const float*>(&c), n, 0.0f);
    }
    vd += n >= kLanes ? d : load_part(reinterpret_cast<const float*>(&d), n, 0.0f);
    store_part(t + j, n, keep);
  }
  const float div = hsum(vd);
  const float ce = hard ? lse_s - s[target] : 0.0f;
  const float loss = (1.0f - o.hard) * o.temperature * o.temperature * div + o.hard * ce;
  if (!grad) return loss;
  // D: dloss/ds
  const float soft = g * (1.0f - o.hard) * o.temperature * (o.kind == DistillKind::kJSD ? 1.0f - o.beta : 1.0f);
  const float center = o.kind == DistillKind::kJSD ? hsum(vc) : div;  // sum_j q_j r_j ("reverse_kl": D itself)
  const float gh = g * o.hard;
  for (int64_t j = 0; j < V; j += kLanes) {
    const int64_t n = V - j;
    const vf x = load_part(s + j, n, 0.0f);
    const vf q = exp_v(x * inv_t - lse_u), kept = load_part(t + j, n, 0.0f);
    vf d = o.kind == DistillKind::kKL ? soft * (q - kept) : soft * q * (kept - center);
    if (hard) d += gh * exp_v(x - lse_s);
    store_part(s + j, n, d);
  }
  if (hard) s[target] -= gh;
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_distillation_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& grad_scale, c10::string_view kind, double temperature, double beta,
    double hard_label_weight, int64_t ignore_index, int64_t chunk) {
  const DistillKind k = parse_distill_kind(std::string_view(kind.data(), kind.size()));
  check_linear_distillation_loss_args(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                      grad_scale, k, temperature, beta, hard_label_weight, ignore_index, chunk,
                                      c10::DeviceType::CPU);
  const int64_t N = student_hidden.size(0), V = student_weight.size(0);
  const bool grad = grad_scale.has_value();
  const Options o{k, static_cast<float>(temperature), static_cast<float>(beta), static_cast<float>(hard_label_weight),
                  ignore_index, target.has_value()};
  at::Tensor losses = at::empty({N}, student_hidden.options().dtype(at::kFloat));
  const int64_t* tgt = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  const float* scale = grad ? grad_scale->data_ptr<float>() : nullptr;
  float* loss_out = losses.data_ptr<float>();
  const at::Tensor twt = teacher_weight.t();

  LinearGrads g = walk_linear_chunks(student_hidden, student_weight, chunk, grad,
                                     [&](int64_t r0, int64_t c, at::Tensor& x) {
    at::Tensor y = at::mm(teacher_hidden.narrow(0, r0, c), twt);
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, c, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        loss_out[r0 + i] = row_pass(xp + i * V, yp + i * V, V, tgt ? tgt[r0 + i] : 0, o,
                                    grad ? scale[r0 + i] : 0.0f, grad);
      }
    });
  });
  if (!grad) return {losses, g.grad_hidden, student_weight.new_empty({0})};
  return {losses, g.grad_hidden, g.grad_weight_acc.to(student_weight.scalar_type())};
}

}  // namespace
}  // namespace pytrain::cpu

TORCH_LIBRARY_IMPL(pytrain, CPU, m) {
  m.impl("linear_distillation_loss", &pytrain::cpu::linear_distillation_loss);
}
