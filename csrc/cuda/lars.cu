// CUDA LARS / LARC step (You et al. 2017, "Large Batch Training of Convolutional Networks"; timm Lars
// conventions).  Per tensor, in fp32 (full contract: pytrain/testing/optim_ref.py):
//   tr = tc * |w| / (|g| + wd * |w| + eps)  (1 if |w| or |g| is 0);  tr = min(tr / lr, 1) if trust_clip
//   d = (g + wd * w) * tr if adapt else g;  b = d (first step) | momentum * b + (1 - dampening) * d
//   d = d + momentum * b (nesterov) | b;  w -= lr * d
// With adapt, a first multi-tensor pass writes per-chunk partial sums of w^2 and g^2, one block per tensor
// reduces them in a fixed order into tr on the device (deterministic, no host sync), and the update pass
// reads tr[tensor].  Element operations are correctly rounded, in the reference's order (see adamw.cu).
//
// Bytes per element (P = param size): update reads w, g (and b unless init_buffers), writes w (and b):
// 3 P without momentum, 5 P with; adapt adds the norm pass, 2 P.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "cuda/multi_tensor.cuh"
#include "lars_checks.h"

namespace pytrain::cuda {
namespace {

constexpr const char* kOp = "lars_step";

enum LarsList { kParams, kGrads, kMomentumBuffers, kLists };

struct LarsHyper {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, adapt, init_buffers;
};

// Stage 1 terms: w^2 and g^2.
template <class P>
struct LarsNormTerms {
  static constexpr int kVec = 16 / sizeof(P);

  __device__ bool aligned(const Chunk<kLists>& c) const {
    return vec_ok<kVec>(c.at<P>(kParams)) && vec_ok<kVec>(c.at<P>(kGrads));
  }
  __device__ void operator()(const Chunk<kLists>& c, int i, int count, bool vec, float (&acc)[2]) const {
    float w[kVec], g[kVec];
    load(c.at<P>(kParams) + i, count, vec, w);
    load(c.at<P>(kGrads) + i, count, vec, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc[0] += w[j] * w[j];
      acc[1] += g[j] * g[j];
    }
  }
};

// Stage 2: the trust ratio from |w| and |g|.
struct LarsRatio {
  float lr, trust_coefficient, weight_decay, eps;
  bool trust_clip;

  __device__ float operator()(float w_norm, float g_norm) const {
    float tr = 1.f;
    if (w_norm > 0.f && g_norm > 0.f) {
      const float denom = __fadd_rn(__fadd_rn(g_norm, __fmul_rn(weight_decay, w_norm)), eps);
      tr = __fdiv_rn(__fmul_rn(trust_coefficient, w_norm), denom);
    }
    return trust_clip ? fminf(__fdiv_rn(tr, lr), 1.f) : tr;
  }
};

template <class P, bool kMomentum>
struct LarsOp {
  LarsHyper h;
  const float* trust;  // per tensor, when adapt

  __device__ void operator()(const Chunk<kLists>& c) const {
    constexpr int V = 4;
    P* p = c.at<P>(kParams);
    const P* g = c.at<P>(kGrads);
    P* b = c.at<P>(kMomentumBuffers);
    const float tr = h.adapt ? trust[c.tensor] : 1.f;
    const bool vec = vec_ok<V>(p) && vec_ok<V>(g) && (!kMomentum || vec_ok<V>(b));
    for_each_group<V>(c.n, [&](int i, int count) {
      float w[V], d[V], buf[V];
      load(p + i, count, vec, w);
      load(g + i, count, vec, d);
      if (kMomentum && !h.init_buffers) load(b + i, count, vec, buf);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (h.adapt) d[j] = __fmul_rn(__fadd_rn(d[j], __fmul_rn(h.weight_decay, w[j])), tr);
        if constexpr (kMomentum) {
          buf[j] = h.init_buffers ? d[j]
                                  : __fadd_rn(__fmul_rn(h.momentum, buf[j]), __fmul_rn(h.one_minus_dampening, d[j]));
          d[j] = h.nesterov ? __fadd_rn(d[j], __fmul_rn(h.momentum, buf[j])) : buf[j];
        }
        w[j] = __fsub_rn(w[j], __fmul_rn(h.lr, d[j]));
      }
      store(p + i, count, vec, w);
      if constexpr (kMomentum) store(b + i, count, vec, buf);
    });
  }
};

void lars_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                    double momentum, double dampening, double weight_decay, double trust_coefficient, double eps,
                    bool nesterov, bool trust_clip, bool adapt, bool init_buffers) {
  check_lars_args(params, grads, momentum_buffers, momentum, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();

  const LarsHyper h{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                    static_cast<float>(weight_decay), nesterov, adapt, init_buffers};
  const LarsRatio ratio{static_cast<float>(lr), static_cast<float>(trust_coefficient),
                        static_cast<float>(weight_decay), static_cast<float>(eps), trust_clip};
  // Without momentum the buffers are not used (nor touched), as in the reference.
  const Lists<kLists> lists{params, grads, momentum != 0 ? momentum_buffers : at::TensorList()};
  const c10::cuda::CUDAGuard guard(device);
  dispatch_float_dtype(dtype, kOp, "params", [&](auto tag) {
    using P = decltype(tag);
    const at::Tensor trust = adapt ? per_tensor_trust<kLists>(lists, LarsNormTerms<P>{}, ratio) : at::Tensor();
    const float* trust_ptr = adapt ? trust.data_ptr<float>() : nullptr;
    dispatch_bool(momentum != 0, [&](auto has_momentum) {
      multi_tensor_apply<kLists>(lists, LarsOp<P, decltype(has_momentum)::value>{h, trust_ptr});
    });
  });
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("lars_step", &pytrain::cuda::lars_step_cuda); }
