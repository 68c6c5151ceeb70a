// pytrain::adamw_step for CPU tensors: one pass over params, grads and states, chunk by chunk.
//
// Per element (full contract and int8 format in pytrain/testing/optim_ref.py):
//   g = grad * grad_scale (negated if maximize);  w = w * (1 - lr * wd)
//   m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2;  vmax = max(vmax, v) if amsgrad
//   w = w - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
// Variants: params float32/bfloat16/float16; states float32 or bfloat16, or int8 m / uint8 sqrt(v)
// codes with one float32 scale per 256-element block (dequantized, stepped in fp32, requantized block
// by block); optional float32 master weights (params then get the rounded master).  t is each tensor's own
// step count (`steps`: one-element CPU tensors, torch.optim's state["step"], read on the host).
// References: Loshchilov & Hutter 2019 (AdamW); Li et al. 2023 (zero-free grid of the int8 second moment).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "adamw_checks.h"
#include "cpu/multi_tensor.h"

namespace pytrain::cpu {
namespace {

struct AdamWCoeffs {
  float grad_mul;  // grad_scale, negated when maximizing
  float decay;     // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float inv_bias2_sqrt;  // 1 / sqrt(1 - beta2^step): a multiply instead of the reference's divide (<= 1 ulp)
  float eps;
  float step_size;  // lr / (1 - beta1^step)
};

// Constants are computed in double and rounded once to float, as the reference's Python scalars are.
AdamWCoeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, double t,
                        bool maximize, double grad_scale) {
  return {static_cast<float>(maximize ? -grad_scale : grad_scale),
          static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(beta1),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, t))),
          static_cast<float>(eps),
          static_cast<float>(lr / (1.0 - std::pow(beta1, t)))};
}

// One element's moments:  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2  (g scaled first).
inline void adamw_moments(float grad, float& m, float& v, const AdamWCoeffs& c) {
  const float g = grad * c.grad_mul;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
}

// One element's new weight, given the new m and root = sqrt(v) (or sqrt(vmax)).
inline float adamw_weight(float w, float m, float root, const AdamWCoeffs& c) {
  return w * c.decay - c.step_size * m / (root * c.inv_bias2_sqrt + c.eps);
}

// Float states (stored as float32 or bfloat16, here as fp32 tiles).
template <bool kAmsgrad>
PYTRAIN_SIMD void adamw_update(float* __restrict w, const float* __restrict g, float* __restrict m,
                               float* __restrict v, float* __restrict vmax, int64_t n, AdamWCoeffs c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i];
    adamw_moments(g[i], mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    if constexpr (kAmsgrad) {
      vi = vmax[i] > vi ? vmax[i] : vi;
      vmax[i] = vi;
    }
    w[i] = adamw_weight(w[i], mi, std::sqrt(vi), c);
  }
}

// One int8 block: dequantize m (code * scale) and r = sqrt(v) ((code + 1) * scale), step, and
// requantize: m to int8 codes with scale max|m| / 127, r to uint8 codes on the zero-free grid with
// scale max r / 256 (code = rint(r / scale) - 1).  rint rounds half to even like torch.round.
// Multiplying by the reciprocal scale instead of dividing can move a value within an ulp of a
// half-way point to the other code: the rare ties the contract allows, for far fewer divisions.
PYTRAIN_SIMD void adamw_int8_block(float* __restrict w, const float* __restrict g, int8_t* __restrict m_codes,
                                   float* m_scale, uint8_t* __restrict r_codes, float* r_scale, int64_t n,
                                   AdamWCoeffs c) {
  alignas(64) float m[kInt8Block], r[kInt8Block];
  // Three loops: with the int8 loads in the arithmetic loop GCC picks 16-byte vectors for all of it.
  const float m_in = *m_scale, r_in = *r_scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    m[i] = static_cast<float>(m_codes[i]) * m_in;
    r[i] = (static_cast<float>(r_codes[i]) + 1.0f) * r_in;
  }
  float m_max = 0.0f, r_max = 0.0f;
#pragma omp simd reduction(max : m_max, r_max)
  for (int64_t i = 0; i < n; ++i) {
    float mi = m[i], vi = r[i] * r[i];
    adamw_moments(g[i], mi, vi, c);
    const float root = std::sqrt(vi);
    w[i] = adamw_weight(w[i], mi, root, c);
    m[i] = mi;
    r[i] = root;
    const float m_abs = std::fabs(mi);
    m_max = m_abs > m_max ? m_abs : m_max;
    r_max = root > r_max ? root : r_max;
  }
  const float m_out = m_max / kInt8MomentMax, r_out = r_max / kInt8RootGrid;
  const float m_inv = m_out > 0.0f ? 1.0f / m_out : 0.0f;  // all-zero block: codes 0 either way
  const float r_inv = r_out > 0.0f ? 1.0f / r_out : 0.0f;
  // |m| * m_inv <= 127 and r * r_inv <= 256 up to rounding, so only the lower clamp of r is needed.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    m_codes[i] = static_cast<int8_t>(static_cast<int32_t>(std::rint(m[i] * m_inv)));
    r_codes[i] = static_cast<uint8_t>(std::max(static_cast<int32_t>(std::rint(r[i] * r_inv)) - 1, 0));
  }
  *m_scale = m_out;
  *r_scale = r_out;
}

struct AdamWArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
      exp_avg_sq_scales;
  std::vector<AdamWCoeffs> coeffs;  // per tensor: the bias corrections of its step
  bool amsgrad;
};

// m, v (and vmax) of one tensor stored as float32 or bfloat16.
struct FloatStates {
  F32Tiles m, v;
  std::optional<F32Tiles> vmax;
  FloatStates(const AdamWArgs& a, int64_t t)
      : m(a.exp_avgs[t]), v(a.exp_avg_sqs[t]), vmax(a.amsgrad ? std::optional<F32Tiles>(a.max_exp_avg_sqs[t]) : std::nullopt) {}
  bool in_place() const { return m.in_place() && v.in_place() && (!vmax || vmax->in_place()); }
  // Steps elements [begin, begin + n) given their fp32 weights and grads.
  void step(int64_t begin, int64_t n, float* w, const float* g, const AdamWCoeffs& c) const {
    alignas(64) float m_buf[kTile], v_buf[kTile], vmax_buf[kTile];
    float* m_vals = m.load(begin, n, m_buf);
    float* v_vals = v.load(begin, n, v_buf);
    if (vmax) {
      float* vmax_vals = vmax->load(begin, n, vmax_buf);
      adamw_update<true>(w, g, m_vals, v_vals, vmax_vals, n, c);
      vmax->store(begin, n, vmax_vals);
    } else {
      adamw_update<false>(w, g, m_vals, v_vals, nullptr, n, c);
    }
    m.store(begin, n, m_vals);
    v.store(begin, n, v_vals);
  }
};

// m and sqrt(v) of one tensor stored as int8 / uint8 codes with per-block scales; tiles are blocks.
struct Int8States {
  int8_t* m_codes;
  float* m_scales;
  uint8_t* r_codes;
  float* r_scales;
  Int8States(const AdamWArgs& a, int64_t t)
      : m_codes(a.exp_avgs[t].data_ptr<int8_t>()),
        m_scales(a.exp_avg_scales[t].data_ptr<float>()),
        r_codes(a.exp_avg_sqs[t].data_ptr<uint8_t>()),
        r_scales(a.exp_avg_sq_scales[t].data_ptr<float>()) {}
  bool in_place() const { return false; }
  void step(int64_t begin, int64_t n, float* w, const float* g, const AdamWCoeffs& c) const {
    const int64_t block = begin / kInt8Block;
    adamw_int8_block(w, g, m_codes + begin, m_scales + block, r_codes + begin, r_scales + block, n, c);
  }
};

// One chunk, tile by tile: weights and grads as fp32, the states step themselves, weights stored back.
template <class States>
void adamw_chunk(const AdamWArgs& a, const Chunk& c) {
  const int64_t t = c.tensor;
  const bool masters = !a.master_params.empty();
  const F32Tiles param(a.params[t]), grad(a.grads[t]);
  const F32Tiles weight(masters ? a.master_params[t] : a.params[t]);
  const States states(a, t);
  const int64_t tile = tile_size(c.size, weight.in_place() && grad.in_place() && states.in_place());
  alignas(64) float w_buf[kTile], g_buf[kTile];
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t begin = c.begin + off, n = std::min(tile, c.size - off);
    float* w = weight.load(begin, n, w_buf);
    states.step(begin, n, w, grad.load(begin, n, g_buf), a.coeffs[t]);
    weight.store(begin, n, w);
    if (masters) param.store(begin, n, w);
  }
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList exp_avg_scales,
                at::TensorList exp_avg_sq_scales, double lr, double beta1, double beta2, double eps,
                double weight_decay, at::TensorList steps, bool amsgrad, bool maximize, double grad_scale) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
                   exp_avg_sq_scales, steps, amsgrad, c10::DeviceType::CPU);
  std::vector<AdamWCoeffs> coeffs;
  for (const double t : read_adamw_steps(steps)) {
    coeffs.push_back(make_coeffs(lr, beta1, beta2, eps, weight_decay, t, maximize, grad_scale));
  }
  const AdamWArgs args{params,          grads,         exp_avgs,       exp_avg_sqs,       max_exp_avg_sqs,
                       master_params,   exp_avg_scales, exp_avg_sq_scales, std::move(coeffs), amsgrad};
  const ChunkPlan plan(params);
  if (exp_avg_scales.empty()) {
    plan.run_all([&](int64_t, const Chunk& c) { adamw_chunk<FloatStates>(args, c); });
  } else {
    plan.run_all([&](int64_t, const Chunk& c) { adamw_chunk<Int8States>(args, c); });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("adamw_step", &adamw_step); }

}  // namespace pytrain::cpu
