// pytrain::topk_filter for CUDA tensors: the entries of x.flatten() with |x| >= t or NaN (one test: !(|x| < t)),
// in ascending index order, as (values, indices int64).  Reference: pytrain/testing/compress_ref.py; the
// threshold comes from a sample (Deep Gradient Compression, Lin et al. 2018; see pytrain/comm/topk.py).
//
// Stream compaction, mirroring the Triton kernel: count_kernel counts each block's selected entries (kItems
// consecutive entries per thread, a block reduction), an exclusive scan of the counts (at::cumsum) gives each
// block's first output slot and the total (one host sync to size the outputs), and write_kernel recounts and
// places each thread's entries after an in-block exclusive scan.  Comparison in float32 (bfloat16 / float16
// widen exactly).  Two reads of x; the output is ~ratio of it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cmath>
#include <tuple>

#include "cuda/dtype_dispatch.cuh"
#include "topk_checks.h"

namespace pytrain::cuda {
namespace {

constexpr const char* kOp = "topk_filter";
constexpr int kFilterThreads = 256;
constexpr int kItems = 16;
constexpr int64_t kBlockElems = int64_t{kFilterThreads} * kItems;

template <class T>
__device__ __forceinline__ bool selected(const T* x, int64_t i, int64_t n, float t) {
  return i < n && !(fabsf(static_cast<float>(x[i])) < t);
}

template <class T>
__device__ __forceinline__ int thread_count(const T* x, int64_t first, int64_t n, float t) {
  int c = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) c += selected(x, first + j, n, t);
  return c;
}

template <class T>
__global__ void __launch_bounds__(kFilterThreads) count_kernel(const T* x, int64_t n, float t, int64_t* counts) {
  using Reduce = cub::BlockReduce<int, kFilterThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const int64_t first = blockIdx.x * kBlockElems + threadIdx.x * int64_t{kItems};
  const int total = Reduce(storage).Sum(thread_count(x, first, n, t));
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

template <class T>
__global__ void __launch_bounds__(kFilterThreads)
    write_kernel(const T* x, int64_t n, float t, const int64_t* ends, const int64_t* counts, T* values,
                 int64_t* indices) {
  using Scan = cub::BlockScan<int, kFilterThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int64_t first = blockIdx.x * kBlockElems + threadIdx.x * int64_t{kItems};
  int offset = 0;
  Scan(storage).ExclusiveSum(thread_count(x, first, n, t), offset);
  int64_t slot = ends[blockIdx.x] - counts[blockIdx.x] + offset;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (selected(x, first + j, n, t)) {
      values[slot] = x[first + j];
      indices[slot] = first + j;
      ++slot;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> topk_filter_cuda(const at::Tensor& x, double threshold) {
  check_topk_args(x, threshold, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  const float t = static_cast<float>(threshold);
  const at::Tensor counts = at::empty({blocks}, x.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor values, indices;
  dispatch_float_dtype(x.scalar_type(), kOp, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    if (blocks > 0) {
      count_kernel<T><<<blocks, kFilterThreads, 0, stream>>>(xp, n, t, counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor ends = at::cumsum(counts, 0);
    const int64_t total = blocks > 0 ? ends[blocks - 1].item<int64_t>() : 0;
    values = at::empty({total}, x.options());
    indices = at::empty({total}, x.options().dtype(at::kLong));
    if (total > 0) {
      write_kernel<T><<<blocks, kFilterThreads, 0, stream>>>(xp, n, t, ends.data_ptr<int64_t>(),
                                                              counts.data_ptr<int64_t>(),
                                                              static_cast<T*>(values.data_ptr()),
                                                              indices.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {values, indices};
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) { m.impl("topk_filter", &pytrain::cuda::topk_filter_cuda); }
