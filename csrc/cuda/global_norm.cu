// CUDA global L2 norm of a list of tensors: sqrt(sum over all elements of x^2), as a float32 0-dim tensor on
// the tensors' device (the gradient-clipping norm; reference: pytrain/ops/global_norm.py).
// Deterministic two-stage reduction without host sync: a multi-tensor pass writes one partial sum per chunk
// (fixed per-thread order and shuffle tree), then one block sums all partials in a fixed order.  Squares are
// formed and summed in double, so finite float32 values neither overflow (float squares are inf above ~1.8e19)
// nor underflow (0 below ~1e-23); the double root is rounded once to float.  The kernel is memory-bound: the
// double arithmetic (half the float rate on sm_90) does not show.
// Bytes per element: one read (4 for float32, 2 for bfloat16 / float16).
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "cuda/multi_tensor.cuh"
#include "multi_tensor_checks.h"

namespace pytrain::cuda {
namespace {

constexpr const char* kOp = "global_norm";

template <class T>
struct SquareTerms {
  static constexpr int kVec = 16 / sizeof(T);

  __device__ bool aligned(const Chunk<1>& c) const { return vec_ok<kVec>(c.at<T>(0)); }
  __device__ void operator()(const Chunk<1>& c, int i, int count, bool vec, double (&acc)[1]) const {
    float x[kVec];
    load(c.at<T>(0) + i, count, vec, x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[0] += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  }
};

__global__ void __launch_bounds__(kThreads) norm_of_partials_kernel(const double* partials, int64_t n, float* out) {
  double sum[1];
  block_sum_rows<1>(partials, 0, n, sum);
  if (threadIdx.x == 0) *out = static_cast<float>(sqrt(sum[0]));
}

at::Tensor global_norm_cuda(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), kOp, ": needs at least one tensor");
  check_float_tensors(kOp, "tensors", tensors, c10::DeviceType::CUDA);
  const at::ScalarType dtype = tensors[0].scalar_type();

  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto options = tensors[0].options().dtype(at::kFloat);
  const int64_t nchunks = total_chunks(tensors);
  const at::Tensor partials = at::empty({nchunks}, options.dtype(at::kDouble));
  at::Tensor out = at::empty({}, options);
  dispatch_float_dtype(dtype, kOp, "tensors", [&](auto tag) {
    using T = decltype(tag);
    multi_tensor_apply<1>({tensors}, ChunkSumOp<1, 1, SquareTerms<T>, double>{{}, partials.data_ptr<double>()});
  });
  norm_of_partials_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(partials.data_ptr<double>(),
                                                                                   nchunks, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("global_norm", &pytrain::cuda::global_norm_cuda); }
