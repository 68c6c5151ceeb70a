// pytrain::lars_step for CPU tensors.
//
// Per tensor (full contract in pytrain/testing/optim_ref.py):
//   tr = tc * |w| / (|g| + wd * |w| + eps)   (1 if |w| or |g| is 0);   tr = min(tr / lr, 1) if trust_clip
//   d  = (g + wd * w) * tr   if adapt, else g
//   b  = d on the first step, else momentum * b + (1 - dampening) * d;   d = d + momentum * b (nesterov) or b
//   w  = w - lr * d
// With adapt, pass 1 sums w^2 and g^2 per chunk (added per tensor in chunk order, so the norms do
// not depend on the thread count) and pass 2 updates.  Both passes run on one cache-sized
// batch of tensors before the next, pass 2 walking backwards, so pass 2 mostly reads from cache.
// References: You et al. 2017, "Large Batch Training of Convolutional Networks"; timm's Lars.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/multi_tensor.h"
#include "lars_checks.h"

namespace pytrain::cpu {
namespace {

enum class Momentum { kNone, kInit, kUpdate };

struct LarsCoeffs {
  float lr, weight_decay, momentum, dampening_complement;  // the last is 1 - dampening
};

template <bool kAdapt, Momentum kMomentum, bool kNesterov>
PYTRAIN_SIMD void lars_update(float* __restrict w, const float* __restrict g, float* __restrict buf, int64_t n,
                              LarsCoeffs c, float trust) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float d = kAdapt ? (g[i] + c.weight_decay * w[i]) * trust : g[i];
    if constexpr (kMomentum != Momentum::kNone) {
      const float b = kMomentum == Momentum::kInit ? d : c.momentum * buf[i] + c.dampening_complement * d;
      buf[i] = b;
      d = kNesterov ? d + c.momentum * b : b;
    }
    w[i] = w[i] - c.lr * d;
  }
}

// Pass 1: sums of w^2 and g^2 added to *w_sq, *g_sq.  One loop over both streams (more memory
// parallelism than two loops); each kTile-element block is summed in fp32 (16 terms per SIMD lane)
// and added in double.
PYTRAIN_SIMD void lars_norms(const float* __restrict w, const float* __restrict g, int64_t n, double* w_sq,
                             double* g_sq) {
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t end = std::min(n, start + kTile);
    float ws = 0.0f, gs = 0.0f;
#pragma omp simd reduction(+ : ws, gs)
    for (int64_t i = start; i < end; ++i) {
      ws += w[i] * w[i];
      gs += g[i] * g[i];
    }
    *w_sq += ws;
    *g_sq += gs;
  }
}

using UpdateFn = void (*)(float*, const float*, float*, int64_t, LarsCoeffs, float);

template <bool kAdapt, Momentum kMomentum>
UpdateFn pick_update(bool nesterov) {
  return nesterov ? &lars_update<kAdapt, kMomentum, true> : &lars_update<kAdapt, kMomentum, false>;
}

template <bool kAdapt>
UpdateFn pick_update(Momentum momentum, bool nesterov) {
  switch (momentum) {
    case Momentum::kNone: return pick_update<kAdapt, Momentum::kNone>(false);
    case Momentum::kInit: return pick_update<kAdapt, Momentum::kInit>(nesterov);
    default: return pick_update<kAdapt, Momentum::kUpdate>(nesterov);
  }
}

struct LarsArgs {
  at::TensorList params, grads, buffers;
  LarsCoeffs coeffs;
  UpdateFn update;
};

// Pass 1: partial sums of w^2 and g^2 of chunk i.
void norms_chunk(const LarsArgs& a, int64_t i, const Chunk& c, double* w_sq, double* g_sq) {
  const F32Tiles param(a.params[c.tensor]), grad(a.grads[c.tensor]);
  const int64_t tile = tile_size(c.size, param.in_place());
  alignas(64) float w_buf[kTile], g_buf[kTile];
  double ws = 0.0, gs = 0.0;
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    lars_norms(param.load(begin, n, w_buf), grad.load(begin, n, g_buf), n, &ws, &gs);
  }
  w_sq[i] = ws;
  g_sq[i] = gs;
}

// Pass 2 (or the only pass): the update of one chunk with its tensor's trust ratio.
void update_chunk(const LarsArgs& a, const Chunk& c, float trust) {
  const F32Tiles param(a.params[c.tensor]), grad(a.grads[c.tensor]);
  const std::optional<F32Tiles> buffer =
      a.buffers.empty() ? std::nullopt : std::optional<F32Tiles>(a.buffers[c.tensor]);
  const int64_t tile = tile_size(c.size, param.in_place());  // buffers and grads share the params' dtype
  alignas(64) float w_buf[kTile], g_buf[kTile], b_buf[kTile];
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    float* w = param.load(begin, n, w_buf);
    const float* g = grad.load(begin, n, g_buf);
    float* b = buffer ? buffer->load(begin, n, b_buf) : nullptr;
    a.update(w, g, b, n, a.coeffs, trust);
    if (buffer) buffer->store(begin, n, b);
    param.store(begin, n, w);
  }
}

// Trust ratio from the squared norms, in float as the reference computes it.
float trust_ratio(double w_sq, double g_sq, double lr, double weight_decay, double trust_coefficient, double eps,
                  bool trust_clip) {
  const float w_norm = static_cast<float>(std::sqrt(w_sq)), g_norm = static_cast<float>(std::sqrt(g_sq));
  float trust = 1.0f;
  if (w_norm > 0.0f && g_norm > 0.0f) {
    trust = static_cast<float>(trust_coefficient) * w_norm /
            (g_norm + static_cast<float>(weight_decay) * w_norm + static_cast<float>(eps));
  }
  return trust_clip ? std::min(trust / static_cast<float>(lr), 1.0f) : trust;
}

void lars_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
               double momentum, double dampening, double weight_decay, double trust_coefficient, double eps,
               bool nesterov, bool trust_clip, bool adapt, bool init_buffers) {
  check_lars_args(params, grads, momentum_buffers, momentum, c10::DeviceType::CPU);
  if (params.empty()) return;

  const Momentum mode = momentum == 0.0 ? Momentum::kNone : init_buffers ? Momentum::kInit : Momentum::kUpdate;
  const LarsArgs args{params,
                      grads,
                      mode == Momentum::kNone ? at::TensorList() : momentum_buffers,
                      {static_cast<float>(lr), static_cast<float>(weight_decay), static_cast<float>(momentum),
                       static_cast<float>(1.0 - dampening)},
                      adapt ? pick_update<true>(mode, nesterov) : pick_update<false>(mode, nesterov)};
  const ChunkPlan plan(params);
  if (!adapt) {
    plan.run_all([&](int64_t, const Chunk& c) { update_chunk(args, c, 1.0f); });
    return;
  }
  std::vector<double> w_sq(plan.num_chunks()), g_sq(plan.num_chunks());
  std::vector<float> trust(params.size());
  const int64_t bytes_per_element = 2 * params[0].element_size();  // pass 2 re-reads w and g
  for (const auto& batch : plan.batches(bytes_per_element, cache_batch_budget())) {
    plan.run(batch.lo, batch.hi, [&](int64_t i, const Chunk& c) { norms_chunk(args, i, c, w_sq.data(), g_sq.data()); });
    for (int64_t t = batch.first_tensor; t < batch.last_tensor; ++t) {
      trust[t] = trust_ratio(plan.tensor_sum(w_sq, t), plan.tensor_sum(g_sq, t), lr, weight_decay,
                             trust_coefficient, eps, trust_clip);
    }
    plan.run(batch.lo, batch.hi, [&](int64_t, const Chunk& c) { update_chunk(args, c, trust[c.tensor]); },
             /*reverse=*/true);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("lars_step", &lars_step); }

}  // namespace pytrain::cpu
