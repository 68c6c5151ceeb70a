// The chunk walk shared by the fused linear losses' C++ kernels, CPU and CUDA alike (csrc/cpu/linear_*.cpp,
// csrc/cuda/linear_*.cu; the Triton path's twin is kernels/linear_chunks.py): a loss of the logits
// x = hidden @ weight^T and its gradients for hidden and weight, never holding the (N, V) logits.
//
// Per chunk of `chunk` token rows:
//   1. x = hidden[chunk] @ weight^T through torch's GEMM (at::mm: MKL / oneDNN, AMX for bfloat16 on the CPU;
//      cuBLAS on CUDA), widened to a float32 (chunk, V) buffer;
//   2. the caller's `rows(r0, c, x)` computes the chunk's losses and, when gradients are wanted, overwrites x
//      with dloss/dx (the per-token upstream gradient included);
//   3. grad_hidden[chunk] = dx @ weight and grad_weight += dx^T @ hidden[chunk] (GEMMs again, dx rounded to the
//      inputs' dtype as in PyTorch's own bfloat16 backward; grad_weight accumulates in float32 across chunks).
// Extra memory: the (chunk, V) float32 buffer (and its copy in the inputs' dtype) plus V x H float32 for
// grad_weight's accumulator: O(chunk x V + V x H).  Every ATen call runs on the tensors' device (and, on CUDA,
// the current stream), so the walk is the same code for both devices.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace pytrain {

// The gradients of one walk: grad_hidden (N, H) in hidden's dtype (empty without gradients) and grad_weight's
// float32 accumulator (V, H) (undefined without gradients).
struct LinearGrads {
  at::Tensor grad_hidden;
  at::Tensor grad_weight_acc;
};

// Walk hidden (N, H) against weight (V, H) in chunks of `chunk` rows, as the header says.  rows(r0, c, x):
// x is the chunk's float32 (c, V) logits of rows [r0, r0 + c), contiguous.
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

}  // namespace pytrain
