// pytrain::linear_cross_entropy for CUDA tensors: the loss of a language-model head and its gradients, chunk by
// chunk of tokens, never holding the (N, V) logits.  Contract (the reference is pytrain/ops/linear_cross_entropy.py):
// for token i with target t != ignore_index (eps = label_smoothing, c = softcap, g = grad_scale[i]):
//
//   x[j]  = hidden[i] . weight[j] + bias[j]
//   z[j]  = c tanh(x[j] / c)                                   (softcap; z = x without one)
//   lse   = log sum_j exp(z[j])                                (online max and sum of exp, one pass)
//   loss  = lse - (1 - eps) z[t] - eps / V sum_j z[j] + z_loss lse^2
//   dx[j] = g (exp(z[j] - lse) (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t]) (1 - (z[j] / c)^2)
//
// F.cross_entropy with label smoothing plus the z-loss of PaLM (Chowdhery et al. 2022); the chunked walk with the
// gradients taken in the forward pass is Liger-Kernel's fused linear cross-entropy (recompute for reduction "none"
// as in Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").  Ignored tokens: loss 0,
// dx 0; a target outside [0, V) that is not ignore_index: NaN loss and dx row (no device sync to check targets).
//
// The chunk walk (logits GEMM by cuBLAS through at::mm, widened to float32; then grad_hidden rows by at::mm and
// grad_weight accumulated in float32) is csrc/linear_chunks.h's, shared with the CPU kernel.  Per chunk one launch
// of rows_kernel, one block per token row (csrc/cuda/linear_chunks.cuh), turns the logits in place into dx in two
// passes over the row:
//   1. add the bias, apply the softcap (z written back when gradients are wanted), and accumulate this thread's
//      online log-sum-exp, sum of z and z[t]; one block reduction of the three gives lse and the loss;
//   2. with gradients, overwrite the row with dx.
// rows_kernel moves 16 bytes per logit (8 without gradients).  Then grad_bias += column sums of dx (at::sum,
// float32).  Input checks: csrc/linear_cross_entropy_checks.h.  Extra memory: O(chunk x V + V x H)
// (csrc/linear_chunks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/linear_chunks.cuh"
#include "linear_cross_entropy_checks.h"

namespace pytrain::cuda {
namespace {

struct Options {
  int64_t ignore_index;
  float eps;           // label smoothing
  float z_loss;
  float cap;           // softcap (0: none)
  float two_over_cap;  // 2 / cap (0: none)
};

// One thread's share of a row: the online log-sum-exp of z, the sum of z, and z[t] (0 but in the thread that
// meets column t).
struct RowSums {
  LogSumExp lse;
  float sum_z;
  float zt;
};

__device__ RowSums combine(const RowSums& a, const RowSums& b) {
  return {combine(a.lse, b.lse), a.sum_z + b.sum_z, a.zt + b.zt};
}

// The chunk's rows: x (rows, V) float32 logits, in place (dx when `scale` is given); bias (V,) float32 or null;
// target, scale (null: no gradients) and losses: the chunk's (rows,) entries.
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(float* x, int64_t rows, int64_t V, const float* bias, const int64_t* target, const float* scale,
                float* losses, Options o) {
  for_each_row(rows, [&](int64_t row) {
    float* z = x + row * V;
    const int64_t t = target[row];
    if (skip_row(z, V, losses + row, t, o.ignore_index, scale != nullptr)) return;
    RowSums part{LogSumExp::empty(), 0.0f, 0.0f};
    for_each_column(V, [&](int64_t j) {  // 1: bias, softcap, log-sum-exp, sum of z, z[t]
      float v = z[j];
      if (bias) v += bias[j];
      if (o.cap > 0.0f) v = o.cap * (1.0f - 2.0f / (expf(v * o.two_over_cap) + 1.0f));  // c tanh(x / c)
      if (scale) z[j] = v;
      part.lse.add(v);
      part.sum_z += v;
      if (j == t) part.zt = v;
    });
    const RowSums sums = block_reduce(part);
    const float lse = sums.lse.value();
    const float inv_v = 1.0f / static_cast<float>(V);
    if (threadIdx.x == 0) {
      losses[row] = lse - (1.0f - o.eps) * sums.zt - o.eps * inv_v * sums.sum_z + o.z_loss * lse * lse;
    }
    if (scale == nullptr) return;
    const float g = scale[row];
    const float a = g * (1.0f + 2.0f * o.z_loss * lse), b = g * o.eps * inv_v, hit = g * (1.0f - o.eps);
    const float inv_cap = 0.5f * o.two_over_cap;
    for_each_column(V, [&](int64_t j) {  // 2: dx
      const float v = z[j];
      float d = a * expf(v - lse) - b;
      if (j == t) d -= hit;
      if (o.cap > 0.0f) {
        const float r = v * inv_cap;
        d *= 1.0f - r * r;
      }
      z[j] = d;
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, int64_t chunk) {
  check_linear_cross_entropy_args(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, z_loss,
                                  softcap, chunk, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool grad = grad_scale.has_value();
  const Options o{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                  static_cast<float>(softcap), softcap > 0.0 ? static_cast<float>(2.0 / softcap) : 0.0f};
  const auto f32_opts = hidden.options().dtype(at::kFloat);
  at::Tensor losses = at::empty({N}, f32_opts);
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor gb_acc = grad && bias.has_value() ? at::zeros({V}, f32_opts) : at::Tensor();
  const float* b = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();

  LinearGrads g = walk_linear_chunks(hidden, weight, chunk, grad, [&](int64_t r0, int64_t c, at::Tensor& x) {
    rows_kernel<<<row_blocks(c), kRowThreads, 0, stream>>>(
        x.data_ptr<float>(), c, V, b, target.data_ptr<int64_t>() + r0,
        grad ? grad_scale->data_ptr<float>() + r0 : nullptr, losses.data_ptr<float>() + r0, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (gb_acc.defined()) gb_acc.add_(x.sum(0));
  });
  if (!grad) return {losses, g.grad_hidden, weight.new_empty({0}), hidden.new_empty({0})};
  at::Tensor grad_bias = bias.has_value() ? gb_acc.to(bias->scalar_type()) : hidden.new_empty({0});
  return {losses, g.grad_hidden, g.grad_weight_acc.to(weight.scalar_type()), grad_bias};
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("linear_cross_entropy", &pytrain::cuda::linear_cross_entropy_cuda); }
