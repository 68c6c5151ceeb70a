// Multi-tensor engine of pytrain's CUDA optimizer kernels, the twin of csrc/cpu/multi_tensor.h (in the spirit of
// NVIDIA apex's multi_tensor_apply).
//
// An op works on Depth parallel tensor lists ("params, grads, exp_avgs, ..."): list d's tensor i goes with
// params[i]; an empty list is an absent optional list and reaches the kernel as null pointers.  The host packs
// up to TensorListArgs<Depth>::kMaxTensors tensors, with all of their kChunk-element chunks, into one
// by-value kernel argument (under the classic 4 KiB parameter limit).  Each CUDA block processes one chunk of
// one tensor and finds that tensor by binary search over the per-tensor prefix sums of chunk counts, so the
// argument is O(tensors) and a launch may hold any number of chunks.  A functor per op does the element work
// on a Chunk; chunks are never strided over.  Chunk indices count over the op's whole list (args.chunk_base),
// so per-chunk workspaces line up between passes.
//
// Reductions are deterministic: per-chunk partials come from a fixed per-thread order plus a fixed shuffle
// tree, and a second kernel sums a tensor's (or the whole list's) partials in a fixed order.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>

#include "cuda/dtype_dispatch.cuh"
#include "int8_states.h"

namespace pytrain::cuda {

constexpr int kThreads = 256;      // threads per block of every kernel here
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16384;  // elements per chunk: whole int8 quantization blocks, whole vectors
constexpr int kArgBytes = 3584;    // TensorListArgs budget; the rest of the 4 KiB is for the functor
constexpr int kMaxParamBytes = 4096;
static_assert(kChunk % kInt8Block == 0 && kChunk % (kThreads * 8) == 0, "chunks hold whole blocks and vectors");

template <int Depth>
using Lists = std::array<at::TensorList, Depth>;

// What one launch processes: tensors [tensor_base, tensor_base + ntensors) of the op's lists.
template <int Depth>
struct TensorListArgs {
  static constexpr int kMaxTensors = (kArgBytes - 24) / (8 * Depth + 8 + 4);  // fits kArgBytes
  void* ptr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_base;                    // op-wide index of this launch's first chunk
  int32_t first_chunk[kMaxTensors + 1];  // launch-local prefix sums of chunk counts
  int32_t ntensors;
  int32_t tensor_base;
};

// One chunk as seen by a functor: elements [start, start + n) of tensor `tensor` in every list.
template <int Depth>
struct Chunk {
  void* base[Depth];
  int64_t start;
  int n;
  int tensor;     // index in the op's lists
  int64_t index;  // op-wide chunk index (workspace slot)

  template <class T>
  __device__ T* at(int list) const {
    return static_cast<T*>(base[list]) + start;
  }
  template <class T>
  __device__ T* whole(int list) const {
    return static_cast<T*>(base[list]);
  }
};

// ------------------------------------------------------------------------------------ element access
template <class T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
// float -> T: round-to-nearest-even for bfloat16/float16 (c10's device conversions); exact for integral codes.
template <class T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

template <class T, int V>
struct alignas(std::min<size_t>(16, sizeof(T) * V)) Vec {
  T v[V];
};

// Whether p may be accessed with Vec<T, V> loads (chunk starts keep the alignment of the tensor base).
template <int V, class T>
__device__ __forceinline__ bool vec_ok(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Vec<T, V>) == 0;
}

// out[j] = p[j] for j < count, 0 beyond; one vector load when the group is whole and aligned.
template <int V, class T>
__device__ __forceinline__ void load(const T* p, int count, bool vec, float (&out)[V]) {
  if (vec && count == V) {
    const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = j < count ? to_float(p[j]) : 0.f;
  }
}

template <int V, class T>
__device__ __forceinline__ void store(T* p, int count, bool vec, const float (&in)[V]) {
  if (vec && count == V) {
    Vec<T, V> x;
#pragma unroll
    for (int j = 0; j < V; ++j) x.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Vec<T, V>*>(p) = x;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < count) p[j] = from_float<T>(in[j]);
    }
  }
}

// Calls f(i, count) for this thread's group [i, i + count) of V consecutive elements of an n-element chunk,
// count in [0, V].  Warp w of an iteration covers the 32 * V elements from base + 32 * V * w.  Every thread
// makes the same number of calls, so f may use warp collectives and the caller block collectives.
template <int V, class F>
__device__ __forceinline__ void for_each_group(int n, F&& f) {
  for (int base = 0; base < n; base += kThreads * V) {
    const int i = base + static_cast<int>(threadIdx.x) * V;
    f(i, max(0, min(V, n - i)));
  }
}

// -------------------------------------------------------------------------------------- reductions
template <int K, class T>
__device__ __forceinline__ void warp_sum(T (&v)[K]) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Sums v over the block in a fixed order (deterministic); the result is valid in thread 0.
// Every thread of the block must call it.
template <int K, class T>
__device__ void block_sum(T (&v)[K]) {
  __shared__ T warp_totals[K][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_sum(v);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_totals[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = lane < kWarps ? warp_totals[k][lane] : T(0);
    warp_sum(v);
  }
  __syncthreads();  // warp_totals may be reused by the next call
}

// Sums rows [begin, end) of a row-major (rows x K) float or double array in double, in a fixed order; result in
// thread 0.
template <int K, class Row>
__device__ void block_sum_rows(const Row* rows, int64_t begin, int64_t end, double (&out)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = 0.0;
  for (int64_t r = begin + threadIdx.x; r < end; r += kThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] += rows[r * K + k];
  }
  block_sum(out);
}

// Stage 1 of the two-stage reductions: partials[chunk * K + k] = sum over the chunk of term k, accumulated and
// stored in Acc (float, or double where squares of finite floats must neither overflow nor underflow).
// Terms: kVec (elements per thread and group), aligned(chunk), and
// operator()(chunk, i, count, vec, acc) adding the terms of elements [i, i + count) to acc[0..K).
template <int Depth, int K, class Terms, class Acc = float>
struct ChunkSumOp {
  Terms terms;
  Acc* partials;

  __device__ void operator()(const Chunk<Depth>& c) const {
    const bool vec = terms.aligned(c);
    Acc acc[K] = {};
    for_each_group<Terms::kVec>(c.n, [&](int i, int count) { terms(c, i, count, vec, acc); });
    block_sum(acc);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) partials[c.index * K + k] = acc[k];
    }
  }
};

// Stage 2 per tensor: trust[tensor] = ratio(|a|, |b|) from the tensor's two per-chunk partial sums of squares.
template <class Ratio>
struct PerTensorTrust {
  const float* partials;
  float* trust;
  Ratio ratio;

  __device__ void operator()(int tensor, int64_t first_chunk, int64_t end_chunk) const {
    double sums[2];
    block_sum_rows<2>(partials, first_chunk, end_chunk, sums);
    if (threadIdx.x == 0) {
      trust[tensor] = ratio(static_cast<float>(sqrt(sums[0])), static_cast<float>(sqrt(sums[1])));
    }
  }
};

// ------------------------------------------------------------------------------------------ kernels
template <int Depth, class Op>
__global__ void __launch_bounds__(kThreads) chunk_kernel(TensorListArgs<Depth> args, Op op) {
  const int block = static_cast<int>(blockIdx.x);
  // The last tensor whose first chunk is <= block; it is never empty since first_chunk[ntensors] > block.
  int lo = 0, hi = args.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  Chunk<Depth> c;
#pragma unroll
  for (int d = 0; d < Depth; ++d) c.base[d] = args.ptr[d][lo];
  c.start = static_cast<int64_t>(block - args.first_chunk[lo]) * kChunk;
  const int64_t left = args.numel[lo] - c.start;
  c.n = static_cast<int>(left < kChunk ? left : kChunk);
  c.tensor = args.tensor_base + lo;
  c.index = args.chunk_base + block;
  op(c);
}

// One block per tensor: op(tensor, first chunk, end chunk) with op-wide chunk indices.
template <int Depth, class Op>
__global__ void __launch_bounds__(kThreads) tensor_kernel(TensorListArgs<Depth> args, Op op) {
  const int t = static_cast<int>(blockIdx.x);
  op(args.tensor_base + t, args.chunk_base + args.first_chunk[t], args.chunk_base + args.first_chunk[t + 1]);
}

// --------------------------------------------------------------------------------------------- host
inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline int64_t total_chunks(at::TensorList tensors) {
  int64_t total = 0;
  for (const at::Tensor& t : tensors) total += chunks_of(t.numel());
  return total;
}

// Calls launch(args, nchunks) for consecutive groups of tensors that fit one TensorListArgs; a tensor's chunks
// are never split between launches.  Groups without any chunk (only empty tensors) are skipped.
template <int Depth, class Launch>
void for_each_launch(const Lists<Depth>& lists, Launch&& launch) {
  using Args = TensorListArgs<Depth>;
  const size_t n = lists[0].size();
  for (int d = 1; d < Depth; ++d) TORCH_INTERNAL_ASSERT(lists[d].empty() || lists[d].size() == n);
  Args args{};
  int64_t nchunks = 0;
  auto flush = [&]() {
    if (args.ntensors == 0) return;
    args.first_chunk[args.ntensors] = static_cast<int32_t>(nchunks);
    if (nchunks > 0) launch(args, nchunks);
    args.tensor_base += args.ntensors;
    args.chunk_base += nchunks;
    args.ntensors = 0;
    nchunks = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = lists[0][i].numel();
    const int64_t chunks = chunks_of(numel);
    TORCH_CHECK(chunks <= INT_MAX, "pytrain: tensor of ", numel, " elements is too large for one launch");
    if (args.ntensors == Args::kMaxTensors || nchunks + chunks > INT_MAX) flush();
    const int t = args.ntensors;
    for (int d = 0; d < Depth; ++d) args.ptr[d][t] = lists[d].empty() ? nullptr : lists[d][i].data_ptr();
    args.numel[t] = numel;
    args.first_chunk[t] = static_cast<int32_t>(nchunks);
    nchunks += chunks;
    args.ntensors = t + 1;
  }
  flush();
}

template <int Depth, class Op>
constexpr void check_param_size() {
  static_assert(sizeof(TensorListArgs<Depth>) + sizeof(Op) <= kMaxParamBytes, "kernel arguments over 4 KiB");
}

// Runs op on every chunk of every tensor of `lists` (lists[0] defines the element counts).
template <int Depth, class Op>
void multi_tensor_apply(const Lists<Depth>& lists, const Op& op) {
  check_param_size<Depth, Op>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_each_launch<Depth>(lists, [&](const TensorListArgs<Depth>& args, int64_t nchunks) {
    chunk_kernel<Depth, Op><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(args, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Runs op once per non-empty tensor of `tensors`, one block each (tensors with no chunk may be skipped).
template <class Op>
void per_tensor_apply(at::TensorList tensors, const Op& op) {
  check_param_size<1, Op>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_each_launch<1>({tensors}, [&](const TensorListArgs<1>& args, int64_t) {
    tensor_kernel<1, Op><<<static_cast<unsigned>(args.ntensors), kThreads, 0, stream>>>(args, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Per-tensor trust ratios without a host sync: stage 1 sums two squared terms per chunk (Terms, see
// ChunkSumOp), stage 2 gives trust[i] = ratio(sqrt(sum a^2), sqrt(sum b^2)) for tensor i, on the device.
template <int Depth, class Terms, class Ratio>
at::Tensor per_tensor_trust(const Lists<Depth>& lists, const Terms& terms, const Ratio& ratio) {
  const auto options = lists[0][0].options().dtype(at::kFloat);
  const at::Tensor partials = at::empty({2 * total_chunks(lists[0])}, options);
  at::Tensor trust = at::empty({static_cast<int64_t>(lists[0].size())}, options);
  multi_tensor_apply<Depth>(lists, ChunkSumOp<Depth, 2, Terms>{terms, partials.data_ptr<float>()});
  per_tensor_apply(lists[0], PerTensorTrust<Ratio>{partials.data_ptr<float>(), trust.data_ptr<float>(), ratio});
  return trust;
}

}  // namespace pytrain::cuda
