// CUDA LAMB step (You et al. 2020, "Large Batch Optimization for Deep Learning"; timm Lamb conventions).
// Per tensor, in fp32 (full contract: pytrain/testing/optim_ref.py):
//   g = grad * grad_scale;  m = b1 * m + b3 * g;  v = b2 * v + (1 - b2) * g * g
//   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w
//   tr = |w| / |u| (1 if either is 0; min(tr, 1) if trust_clip) if adapt else 1;  w -= lr * tr * u
// With adapt, pass 1 computes per-chunk partial sums of w^2 and u^2 (writing nothing else), one block per
// tensor reduces them in a fixed order into tr on the device (deterministic, no host sync), and pass 2
// recomputes m, v, u from the same inputs and writes m, v, w.  Storing m, v in pass 1 for pass 2 to read
// back would round them first with 16-bit states (and fp16 v underflows for small g), while the reference's u
// uses the unrounded values; recomputing moves 11 P per element instead of 10 P and keeps u exact.
// Element operations are correctly rounded, in the reference's order (see adamw.cu).
//
// Bytes per element (P = param size; states have the params' dtype): the update reads w, g, m, v and
// writes w, m, v: 7 P; adapt adds the norm pass reading w, g, m, v: 11 P in all.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "cuda/multi_tensor.cuh"
#include "lamb_checks.h"

namespace pytrain::cuda {
namespace {

constexpr const char* kOp = "lamb_step";

enum LambList { kParams, kGrads, kExpAvgs, kExpAvgSqs, kLists };

struct LambHyper {
  float beta1, beta3, beta2, one_minus_beta2;
  float bias_correction1, bc2_sqrt;  // bc2_sqrt = sqrt(bias_correction2)
  float eps, weight_decay, grad_scale, lr;
};

// One element: updates m, v in place and returns the direction u.
__device__ __forceinline__ float lamb_direction(const LambHyper& h, float w, float g, float& m, float& v) {
  g = __fmul_rn(g, h.grad_scale);
  m = __fadd_rn(__fmul_rn(h.beta1, m), __fmul_rn(h.beta3, g));
  v = __fadd_rn(__fmul_rn(h.beta2, v), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bc2_sqrt), h.eps);
  return __fadd_rn(__fdiv_rn(__fdiv_rn(m, h.bias_correction1), denom), __fmul_rn(h.weight_decay, w));
}

template <int V, class P>
struct LambElements {
  float w[V], g[V], m[V], v[V];

  __device__ void load_all(const Chunk<kLists>& c, int i, int count, bool vec) {
    load(c.at<P>(kParams) + i, count, vec, w);
    load(c.at<P>(kGrads) + i, count, vec, g);
    load(c.at<P>(kExpAvgs) + i, count, vec, m);
    load(c.at<P>(kExpAvgSqs) + i, count, vec, v);
  }
};

template <int V, class P>
__device__ bool lamb_aligned(const Chunk<kLists>& c) {
  return vec_ok<V>(c.at<P>(kParams)) && vec_ok<V>(c.at<P>(kGrads)) && vec_ok<V>(c.at<P>(kExpAvgs)) &&
         vec_ok<V>(c.at<P>(kExpAvgSqs));
}

// Stage 1 terms: w^2 and u^2 (elements past the end excluded: u of a zero-padded lane is 0/0 when eps == 0).
template <class P>
struct LambNormTerms {
  static constexpr int kVec = 16 / sizeof(P);
  LambHyper h;

  __device__ bool aligned(const Chunk<kLists>& c) const { return lamb_aligned<kVec, P>(c); }
  __device__ void operator()(const Chunk<kLists>& c, int i, int count, bool vec, float (&acc)[2]) const {
    LambElements<kVec, P> e;
    e.load_all(c, i, count, vec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float u = lamb_direction(h, e.w[j], e.g[j], e.m[j], e.v[j]);
      if (j < count) {
        acc[0] += e.w[j] * e.w[j];
        acc[1] += u * u;
      }
    }
  }
};

// Stage 2: the trust ratio from |w| and |u|.
struct LambRatio {
  bool trust_clip;

  __device__ float operator()(float w_norm, float u_norm) const {
    const float tr = w_norm > 0.f && u_norm > 0.f ? __fdiv_rn(w_norm, u_norm) : 1.f;
    return trust_clip ? fminf(tr, 1.f) : tr;
  }
};

template <class P>
struct LambOp {
  LambHyper h;
  const float* trust;  // per tensor, or null (tr = 1)

  __device__ void operator()(const Chunk<kLists>& c) const {
    constexpr int V = 4;
    const bool vec = lamb_aligned<V, P>(c);
    const float scale = trust ? __fmul_rn(h.lr, trust[c.tensor]) : h.lr;  // lr * tr
    for_each_group<V>(c.n, [&](int i, int count) {
      LambElements<V, P> e;
      e.load_all(c, i, count, vec);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float u = lamb_direction(h, e.w[j], e.g[j], e.m[j], e.v[j]);
        e.w[j] = __fsub_rn(e.w[j], __fmul_rn(scale, u));
      }
      store(c.at<P>(kParams) + i, count, vec, e.w);
      store(c.at<P>(kExpAvgs) + i, count, vec, e.m);
      store(c.at<P>(kExpAvgSqs) + i, count, vec, e.v);
    });
  }
};

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    double lr, double beta1, double beta2, double beta3, double eps, double weight_decay,
                    double bias_correction1, double bias_correction2, double grad_scale, bool adapt,
                    bool trust_clip) {
  check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();

  const LambHyper h{static_cast<float>(beta1),
                    static_cast<float>(beta3),
                    static_cast<float>(beta2),
                    static_cast<float>(1.0 - beta2),
                    static_cast<float>(bias_correction1),
                    static_cast<float>(std::sqrt(bias_correction2)),
                    static_cast<float>(eps),
                    static_cast<float>(weight_decay),
                    static_cast<float>(grad_scale),
                    static_cast<float>(lr)};
  const Lists<kLists> lists{params, grads, exp_avgs, exp_avg_sqs};
  const c10::cuda::CUDAGuard guard(device);
  dispatch_float_dtype(dtype, kOp, "params", [&](auto tag) {
    using P = decltype(tag);
    const at::Tensor trust = adapt ? per_tensor_trust<kLists>(lists, LambNormTerms<P>{h}, LambRatio{trust_clip})
                                   : at::Tensor();
    multi_tensor_apply<kLists>(lists, LambOp<P>{h, adapt ? trust.data_ptr<float>() : nullptr});
  });
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("lamb_step", &pytrain::cuda::lamb_step_cuda); }
