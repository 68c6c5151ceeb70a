// PowerSGD compression kernels for CPU float32 tensors (Vogels et al. 2019; contract and reference in
// pytrain/ops/powersgd.py).  Batched over same-shape matrices: M (b, n, m), Q (b, m, r), P (b, n, r).
//
//   powersgd_p:     P = M Q        per row of M, r dot products against the rows of Q^T
//   powersgd_q:     Q = M^T P      per column block of M, accumulate sum_i M[i, j] P[i, c] over the rows
//   orthogonalize:  Gram-Schmidt on the columns of P, in place, robust to rank deficiency: with s the largest
//                   input column norm and U the finished columns, per column i:
//                   v1 = p_i - U (U^T p_i);  v = v1 - U (U^T v1);  if (|v| <= eps * s or |v| < |v1| / 2) and s
//                   finite: v = e_j with j the first row of least |U[j, :]|, projected out twice;  u_i = v / |v|
//
// Both products are skinny (r is a few columns) and memory-bound: each reads M exactly once, streaming its rows,
// while the r-column operand stays in cache (Q^T is r * m floats; the accumulators of Q^T's column block
// r * kColBlock floats, in L1).  powersgd_q takes four rows of M per sweep of its accumulators, so they are
// loaded and stored once per four rows.  Its work is cut into (matrix, column block, row segment) tasks; the
// row segments' partial sums (only when there are too few column blocks to feed every thread) are added in a
// fixed order.  Gram-Schmidt touches only P (n * r floats): per column two passes per projection (dot products
// with the finished columns, in double; then the update, summed in double), one for the norm, one to normalise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/multi_tensor.h"
#include "powersgd_checks.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kColBlock = 1024;  // columns of M per powersgd_q task: 4 rows + r accumulators fit L1
constexpr int64_t kRowGroup = 4;     // rows of M per sweep of the accumulators
constexpr int64_t kMinRows = 256;    // rows per powersgd_q row segment, at least

// ------------------------------------------------------------------------------------------ P = M Q
// out[c] = row . qt[c] for c < R (compile-time R: R independent SIMD accumulators in one pass over the row).
template <int R>
PYTRAIN_SIMD void row_dots(const float* __restrict row, const float* __restrict qt, int64_t m, float* out) {
  static_assert(R == 1 || R == 4, "row_dots: 1 or 4 columns");
  if constexpr (R == 4) {
    const float *q0 = qt, *q1 = qt + m, *q2 = qt + 2 * m, *q3 = qt + 3 * m;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t j = 0; j < m; ++j) {
      const float x = row[j];
      a0 += x * q0[j];
      a1 += x * q1[j];
      a2 += x * q2[j];
      a3 += x * q3[j];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
  } else {
    float a0 = 0.0f;
#pragma omp simd reduction(+ : a0)
    for (int64_t j = 0; j < m; ++j) a0 += row[j] * qt[j];
    out[0] = a0;
  }
}

at::Tensor powersgd_p(const at::Tensor& M_in, const at::Tensor& Q_in) {
  auto [M, Q] = check_powersgd_pair("powersgd_p", M_in, "Q", Q_in, -1, c10::DeviceType::CPU);
  const int64_t b = M.size(0), n = M.size(1), m = M.size(2), r = Q.size(2);
  const at::Tensor qt = Q.transpose(1, 2).contiguous();  // (b, r, m): one contiguous row per column of Q
  at::Tensor P = at::empty({b, n, r}, M.options());
  const float* mp = M.data_ptr<float>();
  const float* qp = qt.data_ptr<float>();
  float* pp = P.data_ptr<float>();
  at::parallel_for(0, b * n, std::max<int64_t>(1, kChunk / m), [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const float* mrow = mp + row * m;
      const float* q = qp + (row / n) * r * m;
      float* out = pp + row * r;
      int64_t c = 0;
      for (; c + 4 <= r; c += 4) row_dots<4>(mrow, q + c * m, m, out + c);
      for (; c < r; ++c) row_dots<1>(mrow, q + c * m, m, out + c);
    }
  });
  return M_in.dim() == 3 ? P : P.squeeze(0);
}

// ------------------------------------------------------------------------------------------ Q = M^T P
// acc[c][0, w) += sum over the kRowGroup rows i of rows[i][0, w) * p[i * r + c], for c < r.
PYTRAIN_SIMD void accumulate_rows(const float* __restrict m0, int64_t ld, const float* p, int64_t r, int64_t w,
                                  float* __restrict acc) {
  const float *m1 = m0 + ld, *m2 = m0 + 2 * ld, *m3 = m0 + 3 * ld;
  for (int64_t c = 0; c < r; ++c) {
    const float p0 = p[c], p1 = p[r + c], p2 = p[2 * r + c], p3 = p[3 * r + c];
    float* a = acc + c * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) a[j] += m0[j] * p0 + m1[j] * p1 + m2[j] * p2 + m3[j] * p3;
  }
}

PYTRAIN_SIMD void accumulate_row(const float* __restrict m0, const float* p, int64_t r, int64_t w,
                                 float* __restrict acc) {
  for (int64_t c = 0; c < r; ++c) {
    const float p0 = p[c];
    float* a = acc + c * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) a[j] += m0[j] * p0;
  }
}

// One task: rows [i0, i1) and columns [j0, j0 + w) of matrix `mat`, into out (r, w) with row stride ld_out.
void q_task(const float* M, const float* P, int64_t n, int64_t m, int64_t r, int64_t mat, int64_t i0, int64_t i1,
            int64_t j0, int64_t w, float* out, int64_t ld_out) {
  std::vector<float> acc(r * w, 0.0f);
  const float* base = M + mat * n * m + j0;
  const float* pm = P + mat * n * r;
  int64_t i = i0;
  for (; i + kRowGroup <= i1; i += kRowGroup) accumulate_rows(base + i * m, m, pm + i * r, r, w, acc.data());
  for (; i < i1; ++i) accumulate_row(base + i * m, pm + i * r, r, w, acc.data());
  for (int64_t c = 0; c < r; ++c) std::copy(acc.data() + c * w, acc.data() + (c + 1) * w, out + c * ld_out + j0);
}

at::Tensor powersgd_q(const at::Tensor& M_in, const at::Tensor& P_in) {
  auto [M, P] = check_powersgd_pair("powersgd_q", M_in, "P", P_in, -2, c10::DeviceType::CPU);
  const int64_t b = M.size(0), n = M.size(1), m = M.size(2), r = P.size(2);
  const int64_t col_blocks = (m + kColBlock - 1) / kColBlock;
  // Row segments only when (matrix, column block) tasks cannot feed every thread.
  const int64_t segments = std::clamp<int64_t>(at::get_num_threads() / (b * col_blocks), 1,
                                               std::max<int64_t>(1, n / kMinRows));
  at::Tensor partial = at::empty({segments, b, r, m}, M.options());  // Q^T per row segment
  const float* mp = M.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, segments * b * col_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t seg = task / (b * col_blocks), mat = (task / col_blocks) % b, blk = task % col_blocks;
      const int64_t j0 = blk * kColBlock, i0 = n * seg / segments, i1 = n * (seg + 1) / segments;
      q_task(mp, pp, n, m, r, mat, i0, i1, j0, std::min(kColBlock, m - j0), out + (seg * b + mat) * r * m, m);
    }
  });
  at::Tensor Q = (segments == 1 ? partial.select(0, 0) : partial.sum(0)).transpose(1, 2).contiguous();
  return M_in.dim() == 3 ? Q : Q.squeeze(0);
}

// ------------------------------------------------------------------------------------------ orthogonalize
// Column i of p (n, r, row-major) minus its projection on columns [0, i) (U^T v in double).
void project_out(float* p, int64_t n, int64_t r, int64_t i, std::vector<double>& dots) {
  std::fill(dots.begin(), dots.begin() + i, 0.0);
  for (int64_t row = 0; row < n; ++row) {
    const float* x = p + row * r;
    for (int64_t k = 0; k < i; ++k) dots[k] += static_cast<double>(x[k]) * x[i];
  }
  for (int64_t row = 0; row < n; ++row) {
    float* x = p + row * r;
    double v = x[i];
    for (int64_t k = 0; k < i; ++k) v -= dots[k] * x[k];
    x[i] = static_cast<float>(v);
  }
}

double column_norm(const float* p, int64_t n, int64_t r, int64_t i) {
  double sq = 0.0;
  for (int64_t row = 0; row < n; ++row) sq += static_cast<double>(p[row * r + i]) * p[row * r + i];
  return std::sqrt(sq);
}

// The first row j of least |p[j, 0:i)|^2: e_j is the unit vector furthest from the finished columns.
int64_t furthest_row(const float* p, int64_t n, int64_t r, int64_t i) {
  int64_t best_row = 0;
  double best = INFINITY;
  for (int64_t row = 0; row < n; ++row) {
    double sq = 0.0;
    for (int64_t k = 0; k < i; ++k) sq += static_cast<double>(p[row * r + k]) * p[row * r + k];
    if (sq < best) best = sq, best_row = row;
  }
  return best_row;
}

// Gram-Schmidt on one matrix p (n, r), row-major (contract: pytrain/ops/powersgd.py).
void gram_schmidt(float* p, int64_t n, int64_t r, double eps) {
  double scale = 0.0;
  bool finite = true;
  for (int64_t j = 0; j < r; ++j) {
    const double norm = column_norm(p, n, r, j);
    finite = finite && std::isfinite(norm);
    scale = std::max(scale, norm);
  }
  const double limit = finite ? eps * scale : -1.0;  // nothing is replaced in a non-finite matrix
  std::vector<double> dots(r);
  for (int64_t i = 0; i < r; ++i) {
    project_out(p, n, r, i, dots);
    const double first = column_norm(p, n, r, i);
    project_out(p, n, r, i, dots);
    double norm = column_norm(p, n, r, i);
    if (limit >= 0.0 && (norm <= limit || norm < 0.5 * first)) {
      const int64_t j = furthest_row(p, n, r, i);
      for (int64_t row = 0; row < n; ++row) p[row * r + i] = row == j ? 1.0f : 0.0f;
      project_out(p, n, r, i, dots);
      project_out(p, n, r, i, dots);
      norm = column_norm(p, n, r, i);
    }
    for (int64_t row = 0; row < n; ++row) p[row * r + i] = static_cast<float>(p[row * r + i] / norm);
  }
}

void orthogonalize(const at::Tensor& P_in, double eps) {
  const at::Tensor P = check_orthogonalize_operand(P_in, c10::DeviceType::CPU);
  const int64_t b = P.size(0), n = P.size(1), r = P.size(2);
  float* pp = P.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t mat = lo; mat < hi; ++mat) gram_schmidt(pp + mat * n * r, n, r, eps);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) {
  m.impl("powersgd_p", &powersgd_p);
  m.impl("powersgd_q", &powersgd_q);
  m.impl("orthogonalize", &orthogonalize);
}

}  // namespace pytrain::cpu
