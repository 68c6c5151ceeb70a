// The CUDA row helpers of the fused linear losses (csrc/cuda/linear_cross_entropy.cu,
// csrc/cuda/linear_distillation_loss.cu; the CPU's are csrc/cpu/linear_chunks.h, Triton's kernels/linear_chunks.py).
// Their row kernels run inside the chunk walk of csrc/linear_chunks.h (cuBLAS GEMMs through at::mm around one
// kernel launch per chunk) on the chunk's float32 (c, V) logits: one block of kRowThreads threads per token row,
// thread k taking columns k, k + kRowThreads, ... (coalesced; int64 offsets, as c x V may pass 2^31), so a column is
// read and written by the same thread in every pass over the row and passes need no barrier between them.
//
//   LogSumExp     online log-sum-exp (Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018):
//                 a running max m and sum s of exp(z - m), rescaled by exp(m_old - m_new) when the max grows; two
//                 partial (m, s) combine as m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m); lse = m + log s.
//   block_reduce  a thread's partial struct combined over the block (cub::BlockReduce, a fixed tree: deterministic)
//                 and returned to every thread.
//   skip_row      a token whose target is ignore_index (loss 0, gradient row 0) or outside [0, V) (NaN loss and
//                 gradient row: a wrong target gives NaN rather than a wrong number, as the Triton kernels do; the
//                 CPU kernels reject it).
//   for_each_row / for_each_column   the loops over a chunk's rows (grid-stride over blocks) and a row's columns.
//
// The extension is compiled with --use_fast_math: expf / logf become the ex2 / lg2 approximations (a few ulp),
// and tanhf would become tanh.approx.f32 (about 2^-11 relative): the softcap's tanh is therefore written with expf.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "linear_chunks.h"  // the chunk walk (host), csrc/linear_chunks.h

namespace pytrain::cuda {

constexpr int kRowThreads = 256;  // threads per block; one block per token row

// Running max m and sum s of exp(z - m) over the z seen; empty: {-inf, 0}.
struct LogSumExp {
  float m;
  float s;

  __device__ void add(float z) {
    if (z > m) {
      s = s * expf(m - z) + 1.0f;  // m = -inf (empty): 0 * 0 + 1
      m = z;
    } else {
      s += expf(z - m);
    }
  }
  __device__ float value() const { return m + logf(s); }
  __device__ static LogSumExp empty() { return {-INFINITY, 0.0f}; }
};

__device__ inline LogSumExp combine(const LogSumExp& a, const LogSumExp& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return LogSumExp::empty();  // both empty (exp(-inf - -inf) would be NaN)
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// cub's reduction operator: the `combine` of the partial's type (found by argument-dependent lookup).
struct Combine {
  template <class T>
  __device__ T operator()(const T& a, const T& b) const {
    return combine(a, b);
  }
};

// `part` combined over the block, returned to every thread.  Every thread of the block must call it; it also
// orders the block's earlier global-memory writes before its later reads (it holds __syncthreads).
template <class T>
__device__ T block_reduce(const T& part) {
  using Reduce = cub::BlockReduce<T, kRowThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T total;
  const T reduced = Reduce(storage).Reduce(part, Combine{});
  if (threadIdx.x == 0) total = reduced;
  __syncthreads();
  const T out = total;
  __syncthreads();  // storage and total may be reused by the next call
  return out;
}

// Calls f(row) for the rows of [0, rows) this block owns: blockIdx.x, blockIdx.x + gridDim.x, ...  Every thread of
// the block gets the same rows, so f may return early for a row (uniformly) and use block collectives.
template <class F>
__device__ void for_each_row(int64_t rows, F&& f) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) f(row);
}

// Calls f(j) for this thread's columns j of [0, V).
template <class F>
__device__ void for_each_column(int64_t V, F&& f) {
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) f(j);
}

// A token whose target t is ignore_index (loss 0; with `grad` its V floats at `row` 0) or outside [0, V) (NaN loss
// and row): writes that and returns true; any other token: writes nothing and returns false.  Uniform over the
// block (t is the row's).
__device__ inline bool skip_row(float* row, int64_t V, float* loss, int64_t t, int64_t ignore_index, bool grad) {
  const bool ignored = t == ignore_index;
  if (!ignored && t >= 0 && t < V) return false;
  const float value = ignored ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  if (threadIdx.x == 0) *loss = value;
  if (grad) for_each_column(V, [&](int64_t j) { row[j] = value; });
  return true;
}

// Blocks of a row kernel's launch over `rows` token rows: one per row, up to the grid's limit (for_each_row
// strides past it).
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, std::numeric_limits<int32_t>::max()));
}

}  // namespace pytrain::cuda
