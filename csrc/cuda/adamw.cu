// CUDA AdamW step (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"; torch.optim.AdamW
// semantics).  Per element, in fp32 (full contract and int8 format: pytrain/testing/optim_ref.py):
//   g = +-grad * grad_scale;  w *= 1 - lr * wd;  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
//   vmax = max(vmax, v) (amsgrad);  w -= lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
// Operations follow the reference's order, each correctly rounded (no FMA contraction; IEEE division and
// square root even under --use_fast_math, whose flush-to-zero of denormals remains), so results differ from
// the reference only by its own rounding (torch's CPU sqrt and CUDA division by a scalar are not IEEE).
//
// t is each tensor's own step count (`steps`: one-element CPU tensors read on the host): one set of launches per
// distinct t, one in training.
// Variants: params f32/bf16/f16 (grads alike), optional f32 masters (read w from the master, write the master
// and the rounded param), states f32/bf16 or int8 (blockwise: Dettmers et al. 2022, "8-bit Optimizers via
// Block-wise Quantization"; zero-free sqrt(v) grid of Li et al. 2023).  In int8 mode each warp owns one
// 256-element quantization block at a time (8 elements per lane): it dequantizes, steps, takes the block's
// max |m| and max sqrt(v) with shuffles and requantizes, so one pass over memory suffices.
//
// Bytes per element (P = param size, S = state size): read w (P, or 4 from the master), g (P), m, v (S);
// write w (P, plus 4 to the master), m, v (S); amsgrad adds 2 S; int8 states are S = 1 plus 16 bytes of
// scales per 256 elements.  E.g. f32/f32: 28; bf16/bf16: 14; bf16 + f32 master + f32 states: 28; f32/int8: 16.06.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cmath>
#include <set>
#include <vector>

#include "adamw_checks.h"
#include "cuda/multi_tensor.cuh"

namespace pytrain::cuda {
namespace {

constexpr const char* kOp = "adamw_step";

// Positions of the op's lists in the engine's argument (absent optional lists are null).
enum AdamWList {
  kParams, kGrads, kExpAvgs, kExpAvgSqs, kMaxExpAvgSqs, kMasters, kExpAvgScales, kExpAvgSqScales, kLists
};

// Scalars of one step, computed in double on the host and rounded once, as the reference does.
struct AdamWHyper {
  float decay;  // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float eps, grad_scale;
  bool maximize;
};

// One element's step: returns the new w and updates m, v (and vmax when kAmsgrad) in place.
template <bool kAmsgrad>
__device__ __forceinline__ float adamw_element(const AdamWHyper& h, float w, float g, float& m, float& v,
                                               float& vmax) {
  g = __fmul_rn(g, h.grad_scale);
  if (h.maximize) g = -g;
  w = __fmul_rn(w, h.decay);
  m = __fadd_rn(__fmul_rn(h.beta1, m), __fmul_rn(h.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(h.beta2, v), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
  float second = v;
  if constexpr (kAmsgrad) {
    vmax = fmaxf(vmax, v);
    second = vmax;
  }
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(second), h.bc2_sqrt), h.eps);
  return __fsub_rn(w, __fdiv_rn(__fmul_rn(h.step_size, m), denom));
}

// Reads w from the master when there is one, else from the param.
template <bool kHasMaster, int V, class P>
__device__ __forceinline__ void load_weight(const P* p, const float* master, int count, bool vec, float (&w)[V]) {
  if constexpr (kHasMaster) {
    load(master, count, vec, w);
  } else {
    load(p, count, vec, w);
  }
}

// Writes w to the param (rounded to P) and to the master when there is one.
template <bool kHasMaster, int V, class P>
__device__ __forceinline__ void store_weight(P* p, float* master, int count, bool vec, const float (&w)[V]) {
  store(p, count, vec, w);
  if constexpr (kHasMaster) store(master, count, vec, w);
}

// f32 / bf16 states (S), 4 elements per thread.
template <class P, class S, bool kHasMaster, bool kAmsgrad>
struct AdamWOp {
  AdamWHyper h;

  __device__ void operator()(const Chunk<kLists>& c) const {
    constexpr int V = 4;
    P* p = c.at<P>(kParams);
    const P* g = c.at<P>(kGrads);
    S* m = c.at<S>(kExpAvgs);
    S* v = c.at<S>(kExpAvgSqs);
    S* vm = c.at<S>(kMaxExpAvgSqs);
    float* master = c.at<float>(kMasters);
    const bool vec = vec_ok<V>(p) && vec_ok<V>(g) && vec_ok<V>(m) && vec_ok<V>(v) && (!kAmsgrad || vec_ok<V>(vm)) &&
                     (!kHasMaster || vec_ok<V>(master));
    for_each_group<V>(c.n, [&](int i, int count) {
      float w[V], gr[V], mm[V], vv[V], vmax[V];
      load_weight<kHasMaster>(p + i, master + i, count, vec, w);
      load(g + i, count, vec, gr);
      load(m + i, count, vec, mm);
      load(v + i, count, vec, vv);
      if constexpr (kAmsgrad) load(vm + i, count, vec, vmax);
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = adamw_element<kAmsgrad>(h, w[j], gr[j], mm[j], vv[j], vmax[j]);
      store_weight<kHasMaster>(p + i, master + i, count, vec, w);
      store(m + i, count, vec, mm);
      store(v + i, count, vec, vv);
      if constexpr (kAmsgrad) store(vm + i, count, vec, vmax);
    });
  }
};

// int8 states: m as int8 codes * per-block scale, v as ((uint8 code + 1) * per-block scale)^2 (optim_ref.py).
template <class P, bool kHasMaster>
struct AdamWInt8Op {
  AdamWHyper h;

  __device__ void operator()(const Chunk<kLists>& c) const {
    constexpr int V = static_cast<int>(kInt8Block) / 32;  // a warp covers one quantization block
    P* p = c.at<P>(kParams);
    const P* g = c.at<P>(kGrads);
    int8_t* qm = c.at<int8_t>(kExpAvgs);
    uint8_t* qv = c.at<uint8_t>(kExpAvgSqs);
    float* master = c.at<float>(kMasters);
    // Chunks start on a quantization block boundary (kChunk % kInt8Block == 0).
    float* scale_m = c.whole<float>(kExpAvgScales) + c.start / kInt8Block;
    float* scale_v = c.whole<float>(kExpAvgSqScales) + c.start / kInt8Block;
    const bool vec =
        vec_ok<V>(p) && vec_ok<V>(g) && vec_ok<V>(qm) && vec_ok<V>(qv) && (!kHasMaster || vec_ok<V>(master));
    const int lane = threadIdx.x % 32;
    for_each_group<V>(c.n, [&](int i, int count) {
      const int block_first = i - lane * V;  // this warp's quantization block, warp-uniform
      if (block_first >= c.n) return;        // (the whole warp) past the end of the chunk
      const int qb = block_first / static_cast<int>(kInt8Block);
      float w[V], gr[V], m[V], v[V], r[V];
      load_weight<kHasMaster>(p + i, master + i, count, vec, w);
      load(g + i, count, vec, gr);
      load(qm + i, count, vec, m);
      load(qv + i, count, vec, v);
      const float old_scale_m = scale_m[qb], old_scale_v = scale_v[qb];
      float max_m = 0.f, max_r = 0.f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        m[j] = __fmul_rn(m[j], old_scale_m);
        const float old_r = __fmul_rn(__fadd_rn(v[j], 1.f), old_scale_v);
        v[j] = __fmul_rn(old_r, old_r);
        float no_max;
        w[j] = adamw_element<false>(h, w[j], gr[j], m[j], v[j], no_max);
        // Lanes past the end (loads give g = 0 and code 0) stand for the reference's zero padding: their m is
        // 0; their r would be sqrt(b2) * scale, never above the block's real maximum, but is zeroed all the same.
        r[j] = j < count ? __fsqrt_rn(v[j]) : 0.f;  // the step's sqrt(v), shared after CSE
        max_m = fmaxf(max_m, fabsf(m[j]));
        max_r = fmaxf(max_r, r[j]);
      }
      const float new_scale_m = __fdiv_rn(warp_max(max_m), kInt8MomentMax);
      const float new_scale_v = __fdiv_rn(warp_max(max_r), kInt8RootGrid);
      const float safe_m = new_scale_m > 0.f ? new_scale_m : 1.f;
      const float safe_v = new_scale_v > 0.f ? new_scale_v : 1.f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        m[j] = fminf(fmaxf(rintf(__fdiv_rn(m[j], safe_m)), -127.f), 127.f);
        v[j] = fminf(fmaxf(rintf(__fdiv_rn(r[j], safe_v)) - 1.f, 0.f), 255.f);
      }
      store_weight<kHasMaster>(p + i, master + i, count, vec, w);
      store(qm + i, count, vec, m);
      store(qv + i, count, vec, v);
      if (lane == 0) {
        scale_m[qb] = new_scale_m;
        scale_v[qb] = new_scale_v;
      }
    });
  }
};

// Steps the tensors of `lists`, all at step number `step`.
void adamw_launch(const Lists<kLists>& lists, double lr, double beta1, double beta2, double eps, double weight_decay,
                  double step, bool amsgrad, bool maximize, double grad_scale) {
  const at::TensorList params = lists[kParams];
  const at::ScalarType param_dtype = params[0].scalar_type();
  const bool quantized = !lists[kExpAvgScales].empty();
  const at::ScalarType state_dtype = quantized ? at::kChar : lists[kExpAvgs][0].scalar_type();
  const AdamWHyper h{static_cast<float>(1.0 - lr * weight_decay),
                     static_cast<float>(beta1),
                     static_cast<float>(1.0 - beta1),
                     static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2),
                     static_cast<float>(lr / (1.0 - std::pow(beta1, step))),
                     static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step))),
                     static_cast<float>(eps),
                     static_cast<float>(grad_scale),
                     maximize};
  dispatch_float_dtype(param_dtype, kOp, "params", [&](auto param_tag) {
    using P = decltype(param_tag);
    dispatch_bool(!lists[kMasters].empty(), [&](auto has_master) {
      if (quantized) {
        multi_tensor_apply<kLists>(lists, AdamWInt8Op<P, decltype(has_master)::value>{h});
        return;
      }
      dispatch_dtype<float, c10::BFloat16>(state_dtype, kOp, "exp_avgs", [&](auto state_tag) {
        using S = decltype(state_tag);
        dispatch_bool(amsgrad, [&](auto has_max) {
          multi_tensor_apply<kLists>(lists, AdamWOp<P, S, decltype(has_master)::value, decltype(has_max)::value>{h});
        });
      });
    });
  });
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList exp_avg_scales,
                     at::TensorList exp_avg_sq_scales, double lr, double beta1, double beta2, double eps,
                     double weight_decay, at::TensorList steps, bool amsgrad, bool maximize, double grad_scale) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
                   exp_avg_sq_scales, steps, amsgrad, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const std::vector<double> counts = read_adamw_steps(steps);
  const Lists<kLists> lists{params,          grads,         exp_avgs,       exp_avg_sqs,
                            max_exp_avg_sqs, master_params, exp_avg_scales, exp_avg_sq_scales};
  const c10::cuda::CUDAGuard guard(params[0].device());
  // One set of launches per distinct step number: one in training, unless some params missed steps.
  const std::set<double> distinct(counts.begin(), counts.end());
  if (distinct.size() == 1) {
    adamw_launch(lists, lr, beta1, beta2, eps, weight_decay, counts[0], amsgrad, maximize, grad_scale);
    return;
  }
  for (const double step : distinct) {
    std::array<std::vector<at::Tensor>, kLists> picked;
    for (size_t t = 0; t < counts.size(); ++t) {
      if (counts[t] != step) continue;
      for (int l = 0; l < kLists; ++l) {
        if (!lists[l].empty()) picked[l].push_back(lists[l][t]);
      }
    }
    Lists<kLists> sub;
    for (int l = 0; l < kLists; ++l) sub[l] = picked[l];
    adamw_launch(sub, lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize, grad_scale);
  }
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("adamw_step", &pytrain::cuda::adamw_step_cuda); }
