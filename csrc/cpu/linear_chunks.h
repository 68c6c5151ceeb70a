// The chunk walk shared by the fused linear losses on the CPU (csrc/cpu/linear_cross_entropy.cpp,
// csrc/cpu/linear_distillation_loss.cpp; the Triton path's twin is kernels/linear_chunks.py): a loss of the
// logits x = hidden @ weight^T and its gradients for hidden and weight, never holding the (N, V) logits.
//
// Per chunk of `chunk` token rows:
//   1. x = hidden[chunk] @ weight^T through torch's GEMM (at::mm: MKL / oneDNN, AMX for bfloat16), widened to
//      a float32 (chunk, V) buffer;
//   2. the caller's `rows(r0, c, x)` computes the chunk's losses and, when gradients are wanted, overwrites x
//      with dloss/dx (the per-token upstream gradient included);
//   3. grad_hidden[chunk] = dx @ weight and grad_weight += dx^T @ hidden[chunk] (GEMMs again, dx rounded to the
//      inputs' dtype as in PyTorch's own bfloat16 backward; grad_weight accumulates in float32 across chunks).
// Extra memory: the (chunk, V) float32 buffer (and its copy in the inputs' dtype) plus V x H float32 for
// grad_weight's accumulator: O(chunk x V + V x H).
//
// Also the 16-lane row helpers the row passes share: partial loads / stores at a row's end and e^x.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "cpu/simd.h"

namespace pytrain::cpu {

constexpr float kLog2e = 1.4426950408889634f;

// Lanes [0, n) of a 16-lane block at p; the others `fill`.
inline __attribute__((always_inline)) vf load_part(const float* p, int64_t n, float fill) {
  if (n >= kLanes) return loadv(p);
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? p[i] : fill;
  return loadv(buf);
}
inline __attribute__((always_inline)) void store_part(float* p, int64_t n, vf v) {
  if (n >= kLanes) return storev(p, v);
  float buf[kLanes];
  storev(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}
inline __attribute__((always_inline)) vf exp_v(vf x) { return exp2v(x * kLog2e); }

// Sum of the 16 lanes.
inline __attribute__((always_inline)) float hsum(vf v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The gradients of one walk: grad_hidden (N, H) in hidden's dtype (empty without gradients) and grad_weight's
// float32 accumulator (V, H) (undefined without gradients).
struct LinearGrads {
  at::Tensor grad_hidden;
  at::Tensor grad_weight_acc;
};

// Walk hidden (N, H) against weight (V, H) in chunks of `chunk` rows, as the header says.  rows(r0, c, x):
// x is the chunk's float32 (c, V) logits of rows [r0, r0 + c).
template <class Rows>
LinearGrads walk_linear_chunks(const at::Tensor& hidden, const at::Tensor& weight, int64_t chunk, bool grad,
                               Rows&& rows) {
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const bool f32 = hidden.scalar_type() == at::kFloat;
  LinearGrads out{grad ? at::empty_like(hidden) : hidden.new_empty({0}),
                  grad ? at::zeros({V, H}, hidden.options().dtype(at::kFloat)) : at::Tensor()};
  const at::Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t c = std::min(chunk, N - r0);
    const at::Tensor h = hidden.narrow(0, r0, c);
    at::Tensor x = at::mm(h, wt);
    if (!f32) x = x.to(at::kFloat);
    rows(r0, c, x);
    if (!grad) continue;
    const at::Tensor d = f32 ? x : x.to(hidden.scalar_type());
    at::Tensor gh = out.grad_hidden.narrow(0, r0, c);
    at::mm_out(gh, d, weight);
    if (f32) {
      out.grad_weight_acc.addmm_(d.t(), h);
    } else {
      out.grad_weight_acc.add_(at::mm(d.t(), h));
    }
  }
  return out;
}

}  // namespace pytrain::cpu
