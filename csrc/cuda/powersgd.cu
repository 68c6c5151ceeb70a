// PowerSGD compression kernels for CUDA float32 tensors (Vogels et al. 2019), mirroring csrc/cpu/powersgd.cpp
// (contract and reference: pytrain/ops/powersgd.py).  Batched: M (b, n, m), Q (b, m, r), P (b, n, r).
//
//   powersgd_p:     P = M Q     one warp per row of M: lanes stride over the row, kCols columns of Q at a time,
//                               then a shuffle reduction (M read once for r <= kCols)
//   powersgd_q:     Q = M^T P   one thread per column of M, rows split into segments (grid.y) so the grid fills
//                               the GPU; coalesced row reads, kCols accumulators per thread; the segments'
//                               partial sums are added by at::sum in a fixed order (deterministic)
//   orthogonalize:  Gram-Schmidt robust to rank deficiency, as the CPU kernel: one block per matrix; per column
//                   i, v -= U (U^T v) twice (block reductions in double), a column with |v| <= eps * (largest
//                   input column norm) or halved by the second pass replaced by e_j (j: first row of least
//                   |U[j, :]|) projected out twice, then v / |v|
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "powersgd_checks.h"

namespace pytrain::cuda {
namespace {

constexpr int kCols = 4;            // columns of the skinny factor per pass over M
constexpr int kThreadsP = 256;      // 8 warps: 8 rows per block
constexpr int kThreadsQ = 256;      // columns per block
constexpr int kThreadsOrtho = 256;
constexpr int64_t kMinSegment = 64;  // rows per powersgd_q segment, at least

// ------------------------------------------------------------------------------------------ P = M Q
__global__ void __launch_bounds__(kThreadsP) p_kernel(const float* M, const float* Q, float* P, int64_t b, int64_t n,
                                                      int64_t m, int r) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t{kThreadsP / 32} + threadIdx.x / 32;  // over all b * n rows
  if (row >= b * n) return;
  const float* mrow = M + row * m;
  const float* q = Q + (row / n) * m * r;
  for (int c0 = 0; c0 < r; c0 += kCols) {
    float acc[kCols] = {};
    for (int64_t j = lane; j < m; j += 32) {
      const float x = mrow[j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (c0 + c < r) acc[c] += x * q[j * r + c0 + c];
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      for (int off = 16; off > 0; off /= 2) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
      if (lane == 0 && c0 + c < r) P[row * r + c0 + c] = acc[c];
    }
  }
}

at::Tensor powersgd_p_cuda(const at::Tensor& M_in, const at::Tensor& Q_in) {
  auto [M, Q] = check_powersgd_pair("powersgd_p", M_in, "Q", Q_in, -1, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t b = M.size(0), n = M.size(1), m = M.size(2);
  const int r = static_cast<int>(Q.size(2));
  at::Tensor P = at::empty({b, n, r}, M.options());
  const int64_t blocks = (b * n + kThreadsP / 32 - 1) / (kThreadsP / 32);
  p_kernel<<<blocks, kThreadsP, 0, at::cuda::getCurrentCUDAStream()>>>(M.data_ptr<float>(), Q.data_ptr<float>(),
                                                                      P.data_ptr<float>(), b, n, m, r);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return M_in.dim() == 3 ? P : P.squeeze(0);
}

// ------------------------------------------------------------------------------------------ Q = M^T P
// partial[seg, mat, c, j] = sum over the segment's rows i of M[mat, i, j] * P[mat, i, c].
__global__ void __launch_bounds__(kThreadsQ) q_kernel(const float* M, const float* P, float* partial, int64_t b,
                                                      int64_t n, int64_t m, int r, int64_t segments) {
  const int64_t j = blockIdx.x * int64_t{kThreadsQ} + threadIdx.x;
  const int64_t seg = blockIdx.y, mat = blockIdx.z;
  if (j >= m) return;
  const int64_t i0 = n * seg / segments, i1 = n * (seg + 1) / segments;
  const float* mm = M + mat * n * m;
  const float* pm = P + mat * n * r;
  float* out = partial + (seg * b + mat) * r * m;
  for (int c0 = 0; c0 < r; c0 += kCols) {
    float acc[kCols] = {};
    for (int64_t i = i0; i < i1; ++i) {
      const float x = mm[i * m + j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (c0 + c < r) acc[c] += x * pm[i * r + c0 + c];
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (c0 + c < r) out[(c0 + c) * m + j] = acc[c];
    }
  }
}

at::Tensor powersgd_q_cuda(const at::Tensor& M_in, const at::Tensor& P_in) {
  auto [M, P] = check_powersgd_pair("powersgd_q", M_in, "P", P_in, -2, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t b = M.size(0), n = M.size(1), m = M.size(2);
  const int r = static_cast<int>(P.size(2));
  const int64_t col_blocks = (m + kThreadsQ - 1) / kThreadsQ;
  const int64_t want = 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t segments = std::clamp<int64_t>(want / (col_blocks * b), 1, std::max<int64_t>(1, n / kMinSegment));
  TORCH_CHECK(b <= 65535 && segments <= 65535, "powersgd_q: batch of ", b, " matrices exceeds the CUDA grid");
  at::Tensor partial = at::empty({segments, b, r, m}, M.options());
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(segments), static_cast<unsigned>(b));
  q_kernel<<<grid, kThreadsQ, 0, at::cuda::getCurrentCUDAStream()>>>(M.data_ptr<float>(), P.data_ptr<float>(),
                                                                     partial.data_ptr<float>(), b, n, m, r, segments);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor Q = (segments == 1 ? partial.select(0, 0) : partial.sum(0)).transpose(1, 2).contiguous();
  return M_in.dim() == 3 ? Q : Q.squeeze(0);
}

// ------------------------------------------------------------------------------------------ orthogonalize
using OrthoReduce = cub::BlockReduce<double, kThreadsOrtho>;

struct RowSq {  // a row's squared norm over the finished columns, and the row
  double sq;
  int64_t row;
};

struct FirstLeast {  // the smaller squared norm; on a tie the first row
  __device__ RowSq operator()(const RowSq& a, const RowSq& b) const {
    return (b.sq < a.sq || (b.sq == a.sq && b.row < a.row)) ? b : a;
  }
};

using RowReduce = cub::BlockReduce<RowSq, kThreadsOrtho>;

struct OrthoShared {
  union {
    OrthoReduce::TempStorage sum;
    RowReduce::TempStorage row;
  } storage;
  double total;
  int64_t row;
};

// The block's sum of `part`, returned to every thread.
__device__ double block_sum(double part, OrthoShared& sh) {
  const double total = OrthoReduce(sh.storage.sum).Sum(part);
  if (threadIdx.x == 0) sh.total = total;
  __syncthreads();
  const double out = sh.total;
  __syncthreads();  // sh reusable
  return out;
}

__device__ double column_norm(const float* p, int64_t n, int r, int i, OrthoShared& sh) {
  double part = 0.0;
  for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) {
    part += static_cast<double>(p[row * r + i]) * p[row * r + i];
  }
  return sqrt(block_sum(part, sh));
}

// Column i minus its projection on columns [0, i); dots: r doubles of shared memory.
__device__ void project_out(float* p, int64_t n, int r, int i, double* dots, OrthoShared& sh) {
  for (int k = 0; k < i; ++k) {
    double part = 0.0;
    for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) {
      part += static_cast<double>(p[row * r + k]) * p[row * r + i];
    }
    const double dot = block_sum(part, sh);
    if (threadIdx.x == 0) dots[k] = dot;
  }
  __syncthreads();  // dots visible
  for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) {
    float* x = p + row * r;
    double v = x[i];
    for (int k = 0; k < i; ++k) v -= dots[k] * x[k];
    x[i] = static_cast<float>(v);
  }
  __syncthreads();  // column i final before it is read again, dots reusable
}

// The first row of least |p[row, 0:i)|^2, for every thread.
__device__ int64_t furthest_row(const float* p, int64_t n, int r, int i, OrthoShared& sh) {
  RowSq best{INFINITY, n};
  for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) {
    double sq = 0.0;
    for (int k = 0; k < i; ++k) sq += static_cast<double>(p[row * r + k]) * p[row * r + k];
    if (sq < best.sq) best = RowSq{sq, row};
  }
  const RowSq least = RowReduce(sh.storage.row).Reduce(best, FirstLeast());
  if (threadIdx.x == 0) sh.row = least.row;
  __syncthreads();
  const int64_t out = sh.row;
  __syncthreads();
  return out;
}

__global__ void __launch_bounds__(kThreadsOrtho) orthogonalize_kernel(float* P, int64_t n, int r, double eps) {
  __shared__ OrthoShared sh;
  extern __shared__ double dots[];  // r entries
  float* p = P + static_cast<int64_t>(blockIdx.x) * n * r;
  double scale = 0.0;
  bool finite = true;
  for (int j = 0; j < r; ++j) {
    const double norm = column_norm(p, n, r, j, sh);
    finite = finite && isfinite(norm);
    scale = fmax(scale, norm);
  }
  const double limit = finite ? eps * scale : -1.0;  // nothing is replaced in a non-finite matrix
  for (int i = 0; i < r; ++i) {
    project_out(p, n, r, i, dots, sh);
    const double first = column_norm(p, n, r, i, sh);
    project_out(p, n, r, i, dots, sh);
    double norm = column_norm(p, n, r, i, sh);
    if (limit >= 0.0 && (norm <= limit || norm < 0.5 * first)) {  // the same on every thread (block-wide values)
      const int64_t j = furthest_row(p, n, r, i, sh);
      for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) p[row * r + i] = row == j ? 1.0f : 0.0f;
      __syncthreads();
      project_out(p, n, r, i, dots, sh);
      project_out(p, n, r, i, dots, sh);
      norm = column_norm(p, n, r, i, sh);
    }
    for (int64_t row = threadIdx.x; row < n; row += kThreadsOrtho) {
      p[row * r + i] = static_cast<float>(p[row * r + i] / norm);
    }
    __syncthreads();  // column i final before the next column's reductions
  }
}

void orthogonalize_cuda(const at::Tensor& P_in, double eps) {
  const at::Tensor P = check_orthogonalize_operand(P_in, c10::DeviceType::CUDA);
  const int64_t b = P.size(0), n = P.size(1);
  const int r = static_cast<int>(P.size(2));
  const c10::cuda::CUDAGuard guard(P.device());
  orthogonalize_kernel<<<b, kThreadsOrtho, r * sizeof(double), at::cuda::getCurrentCUDAStream()>>>(
      P.data_ptr<float>(), n, r, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace pytrain::cuda

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) {
  m.impl("powersgd_p", &pytrain::cuda::powersgd_p_cuda);
  m.impl("powersgd_q", &pytrain::cuda::powersgd_q_cuda);
  m.impl("orthogonalize", &pytrain::cuda::orthogonalize_cuda);
}
