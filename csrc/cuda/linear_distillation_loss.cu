// pytrain::linear_distillation_loss for CUDA tensors: a student's head distilled from a teacher's (forward KL,
// reverse KL or generalised JSD at temperature T, optionally mixed with cross-entropy on hard labels) and the
// student's gradients, chunk by chunk of tokens, never holding either (N, V) logit matrix.  Contract (the reference
// is pytrain/ops/linear_distillation_loss.py): for token i (T = temperature, a = hard_label_weight, b = beta,
// g = grad_scale[i]), with s and t the student's and teacher's logits (V,):
//
//   log q = log_softmax(s / T),  log p = log_softmax(t / T)
//   "kl":          D = sum_j p_j (log p_j - log q_j)                   dD/du = q - p
//   "reverse_kl":  D = sum_j q_j (log q_j - log p_j)                   dD/du_k = q_k (r_k - D),  r = log q - log p
//   "jsd":         D = b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q
//                                                  dD/du_k = (1 - b) q_k (r_k - sum_j q_j r_j),  r = log q - log m
//   loss   = (1 - a) T^2 D + a (lse(s) - s[target])
//   dloss/ds = g ((1 - a) T dD/du + a (softmax(s) - onehot(target)))          (u = s / T)
//
// The T^2 scaling is Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015); the
// generalised JSD is that of Agarwal et al., "On-Policy Distillation of Language Models" (ICLR 2024, GKD) and of
// Liger-Kernel's fused linear JSD.  Tokens whose target is ignore_index: loss 0, no gradient; a target outside
// [0, V) that is not ignore_index: NaN loss and gradient row (no device sync to check targets).  The teacher gets
// no gradient.
//
// The chunk walk over the student (logits GEMM by cuBLAS through at::mm, widened to float32; then grad_hidden rows
// by at::mm and grad_weight accumulated in float32) is csrc/linear_chunks.h's, shared with the CPU kernel; inside
// it each chunk also gets the teacher's logits (at::mm, float32, no grad).  Then one launch of rows_kernel, one block
// per token row (csrc/cuda/linear_chunks.cuh), makes three passes over the row's two logit rows:
//   1. online log-sum-exps of s / T, t / T (and of s for the hard labels) and s[target]; one block reduction;
//   2. the divergence D (and sum_j q_j r_j for "jsd"), writing into the teacher's row p ("kl") or r; one block
//      reduction gives the loss;
//   3. with gradients, the student's row becomes dloss/ds.
// Input checks: csrc/linear_distillation_loss_checks.h.  Extra memory: the two (chunk, V) float32 buffers plus
// csrc/linear_chunks.h's: O(chunk x V + V x Hs).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <tuple>

#include "cuda/linear_chunks.cuh"
#include "linear_distillation_loss_checks.h"

namespace pytrain::cuda {
namespace {

struct Options {
  int64_t ignore_index;
  float temperature;
  float inv_t;  // 1 / T
  float beta;   // "jsd" only, as the two logs
  float log_beta, log_one_minus_beta;
  float hard;   // hard_label_weight
};

// Pass 1's share of one thread: log-sum-exps of s / T, t / T and s, and s[target] (0 but in the thread that meets
// column target).
struct RowLse {
  LogSumExp u, v, s;
  float s_target;
};

__device__ RowLse combine(const RowLse& a, const RowLse& b) {
  return {combine(a.u, b.u), combine(a.v, b.v), combine(a.s, b.s), a.s_target + b.s_target};
}

// Pass 2's share: D and, for "jsd", sum_j q_j r_j.
struct RowDivergence {
  float d;
  float qr;
};

__device__ RowDivergence combine(const RowDivergence& a, const RowDivergence& b) { return {a.d + b.d, a.qr + b.qr}; }

// The chunk's rows: s_all (student logits, in place: dloss/ds when `scale` is given) and t_all (teacher logits,
// scratch), (rows, V) float32; target (null: none), scale (null: no gradients) and losses: the chunk's (rows,)
// entries.
template <DistillKind kKind>
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(float* s_all, float* t_all, int64_t rows, int64_t V, const int64_t* target, const float* scale,
                float* losses, Options o) {
  for_each_row(rows, [&](int64_t row) {
    float* s = s_all + row * V;
    float* t = t_all + row * V;
    const int64_t tgt = target ? target[row] : -1;  // -1: no column is the target
    if (target && skip_row(s, V, losses + row, tgt, o.ignore_index, scale != nullptr)) return;
    const bool hard = o.hard > 0.0f;  // implies a target (checked)
    RowLse part{LogSumExp::empty(), LogSumExp::empty(), LogSumExp::empty(), 0.0f};
    for_each_column(V, [&](int64_t j) {  // 1: log-sum-exps
      const float x = s[j];
      part.u.add(x * o.inv_t);
      part.v.add(t[j] * o.inv_t);
      if (hard) part.s.add(x);
      if (j == tgt) part.s_target = x;
    });
    const RowLse lse = block_reduce(part);
    const float lse_u = lse.u.value(), lse_v = lse.v.value(), lse_s = hard ? lse.s.value() : 0.0f;

    RowDivergence div_part{0.0f, 0.0f};
    for_each_column(V, [&](int64_t j) {  // 2: the divergence; the teacher's row becomes p or r
      const float lq = s[j] * o.inv_t - lse_u, lp = t[j] * o.inv_t - lse_v;
      const float q = expf(lq), p = expf(lp);
      if constexpr (kKind == DistillKind::kKL) {
        div_part.d += p * (lp - lq);
        t[j] = p;
      } else if constexpr (kKind == DistillKind::kReverseKL) {
        const float r = lq - lp;
        div_part.d += q * r;
        t[j] = r;
      } else {  // log m = logaddexp(log b + log p, log(1 - b) + log q)
        const float wp = lp + o.log_beta, wq = lq + o.log_one_minus_beta;
        const float hi = fmaxf(wp, wq);
        const float lm = hi + log1pf(expf(fminf(wp, wq) - hi));
        const float r = lq - lm;
        div_part.d += o.beta * p * (lp - lm) + (1.0f - o.beta) * q * r;
        div_part.qr += q * r;
        t[j] = r;
      }
    });
    const RowDivergence div = block_reduce(div_part);
    if (threadIdx.x == 0) {
      float loss = (1.0f - o.hard) * o.temperature * o.temperature * div.d;
      if (hard) loss += o.hard * (lse_s - lse.s_target);
      losses[row] = loss;
    }
    if (scale == nullptr) return;

    const float g = scale[row];
    const float soft = g * (1.0f - o.hard) * o.temperature * (kKind == DistillKind::kJSD ? 1.0f - o.beta : 1.0f);
    const float center = kKind == DistillKind::kJSD ? div.qr : div.d;  // sum_j q_j r_j ("reverse_kl": D itself)
    const float gh = g * o.hard;
    for_each_column(V, [&](int64_t j) {  // 3: dloss/ds
      const float x = s[j], kept = t[j];
      const float q = expf(x * o.inv_t - lse_u);
      float d = kKind == DistillKind::kKL ? soft * (q - kept) : soft * q * (kept - center);
      if (hard) d += gh * (expf(x - lse_s) - (j == tgt ? 1.0f : 0.0f));
      s[j] = d;
    });
  });
}

template <DistillKind kKind>
void launch_rows(at::Tensor& s, at::Tensor& t, int64_t rows, const int64_t* target, const float* scale,
                 float* losses, const Options& o) {
  rows_kernel<kKind><<<row_blocks(rows), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<float>(), t.data_ptr<float>(), rows, s.size(1), target, scale, losses, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_distillation_loss_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& grad_scale, c10::string_view kind, double temperature, double beta,
    double hard_label_weight, int64_t ignore_index, int64_t chunk) {
  const DistillKind k = parse_distill_kind(std::string_view(kind.data(), kind.size()));
  check_linear_distillation_loss_args(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                      grad_scale, k, temperature, beta, hard_label_weight, ignore_index, chunk,
                                      c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  const int64_t N = student_hidden.size(0);
  const bool grad = grad_scale.has_value();
  const bool jsd = k == DistillKind::kJSD;  // beta is in (0, 1) (checked) and used only then
  const Options o{ignore_index,
                  static_cast<float>(temperature),
                  static_cast<float>(1.0 / temperature),
                  static_cast<float>(beta),
                  jsd ? static_cast<float>(std::log(beta)) : 0.0f,
                  jsd ? static_cast<float>(std::log1p(-beta)) : 0.0f,
                  static_cast<float>(hard_label_weight)};
  at::Tensor losses = at::empty({N}, student_hidden.options().dtype(at::kFloat));
  const at::Tensor twt = teacher_weight.t();

  LinearGrads g = walk_linear_chunks(student_hidden, student_weight, chunk, grad,
                                     [&](int64_t r0, int64_t c, at::Tensor& x) {
    at::Tensor y = at::mm(teacher_hidden.narrow(0, r0, c), twt);
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    const int64_t* tgt = target.has_value() ? target->data_ptr<int64_t>() + r0 : nullptr;
    const float* scale = grad ? grad_scale->data_ptr<float>() + r0 : nullptr;
    float* loss_out = losses.data_ptr<float>() + r0;
    switch (k) {
      case DistillKind::kKL: return launch_rows<DistillKind::kKL>(x, y, c, tgt, scale, loss_out, o);
      case DistillKind::kReverseKL: return launch_rows<DistillKind::kReverseKL>(x, y, c, tgt, scale, loss_out, o);
      case DistillKind::kJSD: return launch_rows<DistillKind::kJSD>(x, y, c, tgt, scale, loss_out, o);
    }
  });
  if (!grad) return {losses, g.grad_hidden, student_weight.new_empty({0})};
  return {losses, g.grad_hidden, g.grad_weight_acc.to(student_weight.scalar_type())};
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) {
  m.impl("linear_distillation_loss", &pytrain::cuda::linear_distillation_loss_cuda);
}
