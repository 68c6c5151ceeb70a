// pytrain::lamb_step for CPU tensors.
//
// Per tensor (full contract in pytrain/testing/optim_ref.py):
//   g = grad * grad_scale;  m = b1 * m + b3 * g;  v = b2 * v + (1 - b2) * g^2
//   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w
//   tr = |w| / |u|  (1 if either is 0; min(tr, 1) if trust_clip)  if adapt, else 1
//   w = w - lr * tr * u
// With adapt, two passes per cache-sized batch of tensors: pass 1 steps m and v, sums w^2 and u^2
// per chunk (added per tensor in chunk order: deterministic) and keeps u in an fp32 scratch buffer;
// pass 2 walks the batch backwards (what pass 1 touched last is still in cache) doing w -= lr * tr * u.
// Keeping u costs 4 bytes per element of the largest batch but spares pass 2 its division and square
// root and the re-reading of m and v, and is exact for bfloat16 / float16 states (u from rounded
// stored moments would differ).  A batch over kMaxKeptDirection elements (one huge tensor) is not
// kept: pass 1 leaves m and v untouched and pass 2 steps them again.  Without adapt: one pass.
// References: You et al. 2020, "Large Batch Optimization for Deep Learning"; timm's Lamb.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "cpu/multi_tensor.h"
#include "lamb_checks.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kMaxKeptDirection = int64_t{1} << 24;  // 64 MiB of fp32 u at most

struct LambCoeffs {
  float grad_scale, beta1, beta3, beta2, one_minus_beta2;
  // 1 / bias_correction1 and 1 / sqrt(bias_correction2): multiplies where the reference divides (<= 1 ulp
  // each), which leaves one division and one square root per element.
  float inv_bias1, inv_bias2_sqrt;
  float eps, weight_decay;
};

// Steps one element's m and v (in registers: a returned pair would keep the loops from vectorizing).
inline void lamb_moments(float& m, float& v, float grad, const LambCoeffs& c) {
  const float g = grad * c.grad_scale;
  m = c.beta1 * m + c.beta3 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
}

// The update direction u of one element.
inline float lamb_direction(float m, float v, float w, const LambCoeffs& c) {
  return (m * c.inv_bias1) / (std::sqrt(v) * c.inv_bias2_sqrt + c.eps) + c.weight_decay * w;
}

// Pass 1: sums of w^2 and u^2 added to *w_sq, *u_sq; with kKeep, the new m, v and u are stored.
// Each kTile-element block is summed in fp32 (16 terms per SIMD lane) and added in double: double
// accumulators in the loop would cost as much as the rest of the arithmetic.
template <bool kKeep>
PYTRAIN_SIMD void lamb_moments_norms(const float* __restrict w, const float* __restrict g, float* __restrict m,
                                     float* __restrict v, float* __restrict u_out, int64_t n, LambCoeffs c,
                                     double* w_sq, double* u_sq) {
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t end = std::min(n, start + kTile);
    float ws = 0.0f, us = 0.0f;
#pragma omp simd reduction(+ : ws, us)
    for (int64_t i = start; i < end; ++i) {
      float mi = m[i], vi = v[i];
      lamb_moments(mi, vi, g[i], c);
      const float u = lamb_direction(mi, vi, w[i], c);
      if constexpr (kKeep) {
        m[i] = mi;
        v[i] = vi;
        u_out[i] = u;
      }
      ws += w[i] * w[i];
      us += u * u;
    }
    *w_sq += ws;
    *u_sq += us;
  }
}

// Pass 2 from the kept u.
PYTRAIN_SIMD void lamb_apply(float* __restrict w, const float* __restrict u, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] = w[i] - scale * u[i];
}

// The whole step: new m and v, w -= scale * u.
PYTRAIN_SIMD void lamb_step_elements(float* __restrict w, const float* __restrict g, float* __restrict m,
                                     float* __restrict v, int64_t n, LambCoeffs c, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i];
    lamb_moments(mi, vi, g[i], c);
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] - scale * lamb_direction(mi, vi, w[i], c);
  }
}

struct LambArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs;
  LambCoeffs coeffs;
};

// The tensors of one chunk as fp32 tiles (all share the params' dtype).
struct LambTiles {
  F32Tiles w, g, m, v;
  LambTiles(const LambArgs& a, int64_t t) : w(a.params[t]), g(a.grads[t]), m(a.exp_avgs[t]), v(a.exp_avg_sqs[t]) {}
};

// Pass 1 over chunk i: sums of w^2 and u^2 into w_sq[i], u_sq[i].  With `u` (the chunk's slots in
// the scratch buffer) it also stores the new m, v and u; without, m and v are left for pass 2.
void norms_chunk(const LambArgs& a, int64_t i, const Chunk& c, float* u, double* w_sq, double* u_sq) {
  const LambTiles tiles(a, c.tensor);
  const int64_t tile = tile_size(c.size, tiles.w.in_place());
  alignas(64) float w_buf[kTile], g_buf[kTile], m_buf[kTile], v_buf[kTile];
  double ws = 0.0, us = 0.0;
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    const float* w = tiles.w.load(begin, n, w_buf);
    const float* g = tiles.g.load(begin, n, g_buf);
    float* m = tiles.m.load(begin, n, m_buf);
    float* v = tiles.v.load(begin, n, v_buf);
    if (u) {
      lamb_moments_norms<true>(w, g, m, v, u + off, n, a.coeffs, &ws, &us);
      tiles.m.store(begin, n, m);
      tiles.v.store(begin, n, v);
    } else {
      lamb_moments_norms<false>(w, g, m, v, nullptr, n, a.coeffs, &ws, &us);
    }
  }
  w_sq[i] = ws;
  u_sq[i] = us;
}

// Pass 2 over one chunk from its kept u: w -= scale * u (scale = lr * trust ratio).
void apply_chunk(const LambArgs& a, const Chunk& c, const float* u, float scale) {
  const F32Tiles weight(a.params[c.tensor]);
  const int64_t tile = tile_size(c.size, weight.in_place());
  alignas(64) float w_buf[kTile];
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    float* w = weight.load(begin, n, w_buf);
    lamb_apply(w, u + off, n, scale);
    weight.store(begin, n, w);
  }
}

// The whole step of one chunk: m, v from the grads, then w -= scale * u.
void step_chunk(const LambArgs& a, const Chunk& c, float scale) {
  const LambTiles tiles(a, c.tensor);
  const int64_t tile = tile_size(c.size, tiles.w.in_place());
  alignas(64) float w_buf[kTile], g_buf[kTile], m_buf[kTile], v_buf[kTile];
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    float* w = tiles.w.load(begin, n, w_buf);
    float* m = tiles.m.load(begin, n, m_buf);
    float* v = tiles.v.load(begin, n, v_buf);
    lamb_step_elements(w, tiles.g.load(begin, n, g_buf), m, v, n, a.coeffs, scale);
    tiles.w.store(begin, n, w);
    tiles.m.store(begin, n, m);
    tiles.v.store(begin, n, v);
  }
}

// lr * trust ratio, in float as the reference computes it.
float step_scale(double w_sq, double u_sq, double lr, bool trust_clip) {
  const float w_norm = static_cast<float>(std::sqrt(w_sq)), u_norm = static_cast<float>(std::sqrt(u_sq));
  float trust = w_norm > 0.0f && u_norm > 0.0f ? w_norm / u_norm : 1.0f;
  if (trust_clip) trust = std::min(trust, 1.0f);
  return static_cast<float>(lr) * trust;
}

void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               double lr, double beta1, double beta2, double beta3, double eps, double weight_decay,
               double bias_correction1, double bias_correction2, double grad_scale, bool adapt, bool trust_clip) {
  check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, c10::DeviceType::CPU);
  if (params.empty()) return;

  const LambArgs args{params,
                      grads,
                      exp_avgs,
                      exp_avg_sqs,
                      {static_cast<float>(grad_scale), static_cast<float>(beta1), static_cast<float>(beta3),
                       static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                       static_cast<float>(1.0 / bias_correction1), static_cast<float>(1.0 / std::sqrt(bias_correction2)),
                       static_cast<float>(eps), static_cast<float>(weight_decay)}};
  const ChunkPlan plan(params);
  if (!adapt) {
    plan.run_all([&](int64_t, const Chunk& c) { step_chunk(args, c, static_cast<float>(lr)); });
    return;
  }
  std::vector<double> w_sq(plan.num_chunks()), u_sq(plan.num_chunks());
  std::vector<float> scale(params.size());
  const int64_t bytes_per_element = 4 * params[0].element_size() + sizeof(float);  // w, g, m, v in; u out
  const std::vector<ChunkPlan::Batch> batches = plan.batches(bytes_per_element, cache_batch_budget());
  auto batch_elements = [&](const ChunkPlan::Batch& b) { return plan.start(b.hi) - plan.start(b.lo); };
  int64_t kept = 0;
  for (const auto& b : batches) {
    if (batch_elements(b) <= kMaxKeptDirection) kept = std::max(kept, batch_elements(b));
  }
  const std::unique_ptr<float[]> u(new float[kept]);  // uninitialized: pass 1 writes before pass 2 reads
  for (const auto& batch : batches) {
    const bool keep = batch_elements(batch) <= kMaxKeptDirection;
    auto u_of = [&](int64_t i) { return keep ? u.get() + plan.start(i) - plan.start(batch.lo) : nullptr; };
    plan.run(batch.lo, batch.hi,
             [&](int64_t i, const Chunk& c) { norms_chunk(args, i, c, u_of(i), w_sq.data(), u_sq.data()); });
    for (int64_t t = batch.first_tensor; t < batch.last_tensor; ++t) {
      scale[t] = step_scale(plan.tensor_sum(w_sq, t), plan.tensor_sum(u_sq, t), lr, trust_clip);
    }
    plan.run(
        batch.lo, batch.hi,
        [&](int64_t i, const Chunk& c) {
          if (keep) {
            apply_chunk(args, c, u_of(i), scale[c.tensor]);
          } else {
            step_chunk(args, c, scale[c.tensor]);
          }
        },
        /*reverse=*/true);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("lamb_step", &lamb_step); }

}  // namespace pytrain::cpu
