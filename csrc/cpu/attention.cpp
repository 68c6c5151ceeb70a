// pytrain::attention_fwd and pytrain::attention_bwd for CPU tensors: FlashAttention-2 (Dao 2023).
//
// Maths, masks and dropout hash: pytrain/ops/attention.py (the contract).  Per query i (rows allowed by the
// causal / sliding-window band, aligned bottom-right), with e(x) = 2^(x log2(e)):
//   forward   S = scale q k^T;  m = max_j S;  l = sum_j e(S - m);  out = sum_j e(S - m) keep / (1 - p) v / l
//             lse = m + ln l   (-inf, out = 0 for rows without keys)
//   backward  P = e(S - lse);  dV = (P keep / (1 - p))^T dO;  dP = dO v^T
//             delta = rowsum(dO * out);  dS = P (dP keep / (1 - p) - delta);  dQ = scale dS k;  dK = scale dS^T q
// The forward walks the key blocks of the band with an online softmax (running max m and sum l) and
// stores only out and lse; the backward recomputes P tile by tile from q, k and lse.
//
// Any finite scores: S is scale * (q k^T) rounded to fp32 as the GEMM stores it (never fused into the
// subtraction), and m, lse are in the units of S.  The forward and backward compute S with the same GEMM
// (same operands, same order), so the row maximum has S - m = 0 exactly and S - lse = -fl(ln l) <= 0 in
// the backward, however large the scores.  (Keeping m in log2 units and converting lse with ln 2 / log2 e,
// or letting S * c - m contract into an FMA, leaves errors of ulps of |S|: 2^(+-512) at |S| = 1e10.)
//
// Layout: tiles hold queries in SIMD lanes.  A q block of kBQ = 64 queries is packed transposed
// (q^T: D x 64), so the score tile S^T (keys x queries) = k q^T is a GEMM whose A operand is read
// row-major from k (broadcasts) and whose B rows are 64-lane vectors; the softmax statistics are then
// per lane (vertical max / sum, no horizontal reductions), and out^T += v^T P^T, dQ^T += k^T dS^T,
// dV += P^T dO and dK += dS^T q are the same GEMM form with other strides.  One micro-kernel
// (register-blocked MR rows x NV 16-lane vectors, fp32 accumulators) serves all of them:
//   * float32 (and float16, converted to float32 up front): FMAs with broadcast scalars;
//   * bfloat16 on CPUs with AVX512_BF16: vdpbf16ps, operands packed as bf16 pairs along the reduction
//     dimension (P and dS are rounded to bf16 for their GEMMs, as FlashAttention does on GPUs); other
//     CPUs (or odd head dims) take the float32 path.
//   * bfloat16 on CPUs with AMX: the same operands (A row-major, B as bf16 pairs: the VNNI layout) through
//     PyTorch's blocked GEMM at::native::cpublas::brgemm, which oneDNN runs on AMX tiles; only the
//     softmax, masks and dropout between the GEMMs are pytrain's.  cpu/attention_isa.h picks the path.
// Tiles outside the band are never visited (loop bounds come from the band); tiles cut by its edges
// are masked element by element.  2^x is a vectorized polynomial (Cephes exp2f, ~1-2 ulp).
//
// Parallelism and determinism: the forward runs (batch, head, q block) items; the backward either
// runs one item per (batch, kv head) doing dQ, dK and dV in a single sweep (key blocks outer, the GQA
// group's heads and q blocks inner; the group's q side packed in per-thread buffers, dQ^T accumulated
// there in fp32), or, when there are too few (batch, kv head) pairs for the threads, separate
// (batch, kv head, key block) items for dK / dV and (batch, head, q block) items for dQ (recomputing
// S and dP once more) over q sides packed up front.  Every accumulator is owned by one item and summed
// in the same order (key blocks ascending for dQ; heads of the group, then q blocks ascending for
// dK / dV) in both schemes, so results are bit-identical run to run, across schemes and thread counts.
// Items are handed out dynamically, costliest first.
//
// Files: this one holds the element-wise tile code (softmax, dS), packing, scheduling, the forward and
// backward drivers and the op registration; cpu/attention_tile.h the GEMM micro-kernel, cpu/simd.h the
// vector helpers, attention_checks.h the input checks.
//
// Memory: O(B H L D), never L x L: the forward allocates out, lse and (bf16) v repacked; the backward
// dq, dk, dv, (bf16) k repacked, and the packed q side (q, dO twice, dQ^T: ~5 fp32 copies of q for the
// heads in flight).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_checks.h"
#include "cpu/attention_tile.h"
#include "cpu/multi_tensor.h"
#include "cpu/simd.h"
#include "lowbias32.h"

namespace pytrain::cpu {
namespace {

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";
constexpr int64_t kBQ = 64;      // queries per block (4 vectors)
constexpr int64_t kBK = 64;      // keys per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kUnbounded = int64_t{1} << 40;  // band side without limit

// ------------------------------------------------------------------------------------ problem
struct Problem {
  int64_t B, H, Hkv, group, Lq, Lk, D, Dp, nqb, nkb;
  int64_t off;          // Lk - Lq: query i is aligned with key i + off (bottom-right)
  int64_t left, right;  // allowed: -left <= j - i - off <= right (kUnbounded: no limit)
  float scale;
  bool dropout;
  float keep_scale;     // 1 / (1 - p)
  uint32_t threshold, s0, s1;
  AttentionPath path;   // cpu/attention_isa.h
  bool bf16dot;         // bf16 operands (the amx or avx512_bf16 path)
  bool amx;             // their GEMMs through cpublas::brgemm
  int lanes;            // fp32 vector width, 16 or 8 (fp32_lanes)
  int64_t Lkp;          // nkb * kBK: keys of the transposed, zero-padded k^T / v^T copies

  // Keys [lo, hi) allowed for some query of [i0, i0 + nq).
  std::pair<int64_t, int64_t> key_range(int64_t i0, int64_t nq) const {
    return {std::max<int64_t>(0, i0 + off - left), std::min<int64_t>(Lk, i0 + nq - 1 + off + right + 1)};
  }
  // Queries [lo, hi) that allow some key of [j0, j0 + nk).
  std::pair<int64_t, int64_t> query_range(int64_t j0, int64_t nk) const {
    return {std::max<int64_t>(0, j0 - off - right), std::min<int64_t>(Lq, j0 + nk - 1 - off + left + 1)};
  }
  std::pair<int64_t, int64_t> key_blocks(int64_t qb) const {
    const auto [lo, hi] = key_range(qb * kBQ, std::min(kBQ, Lq - qb * kBQ));
    return lo < hi ? std::make_pair(lo / kBK, (hi + kBK - 1) / kBK) : std::make_pair(int64_t{0}, int64_t{0});
  }
  std::pair<int64_t, int64_t> query_blocks(int64_t kb) const {
    const auto [lo, hi] = query_range(kb * kBK, std::min(kBK, Lk - kb * kBK));
    return lo < hi ? std::make_pair(lo / kBQ, (hi + kBQ - 1) / kBQ) : std::make_pair(int64_t{0}, int64_t{0});
  }
};

// What the element-wise tile code needs to know about one (q block, key block) tile.
struct Tile {
  int64_t nk;         // key rows
  bool masked;        // some (query, key) pair of the tile lies outside the band
  int32_t dbase;      // j - i - off at (row 0, lane 0)
  int32_t left, right;
  bool dropout;
  float keep_scale;
  uint32_t threshold, s0, bh_s1, j0, i0;
};

Tile make_tile(const Problem& p, int64_t bh, int64_t i0, int64_t nq, int64_t j0, int64_t nk) {
  Tile t;
  t.nk = nk;
  const int64_t lo = j0 - (i0 + nq - 1) - p.off, hi = j0 + nk - 1 - i0 - p.off;  // extremes of j - i - off
  t.masked = hi > p.right || lo < -p.left;
  t.dbase = static_cast<int32_t>(j0 - i0 - p.off);
  t.left = static_cast<int32_t>(std::min<int64_t>(p.left, int64_t{1} << 30));
  t.right = static_cast<int32_t>(std::min<int64_t>(p.right, int64_t{1} << 30));
  t.dropout = p.dropout;
  t.keep_scale = p.keep_scale;
  t.threshold = p.threshold;
  t.s0 = p.s0;
  t.bh_s1 = static_cast<uint32_t>(bh) ^ p.s1;
  t.j0 = static_cast<uint32_t>(j0);
  t.i0 = static_cast<uint32_t>(i0);
  return t;
}

// The element-wise tile code works on vectors V of W = lanes_of<V> queries (16 or 8), kBQ / W per row; the bf16
// paths' pair layout is that of 16-lane vdpbf16ps operands, so their instances are always 16 lanes.
template <class V>
constexpr int kVecs = kBQ / lanes_of<V>;

template <class V>
inline __attribute__((always_inline)) IntOf<V> lane_index(int64_t v) {
  IntOf<V> idx;
  for (int l = 0; l < lanes_of<V>; ++l) idx[l] = static_cast<int32_t>(v * lanes_of<V> + l);
  return idx;
}

// Lanes of row jj inside the band (all ones) or not (zeros).
template <class V>
inline __attribute__((always_inline)) IntOf<V> band_mask(const Tile& t, int64_t jj, IntOf<V> lanes) {
  const IntOf<V> d = (static_cast<int32_t>(t.dbase + jj)) - lanes;
  return (d <= t.right) & (d >= -t.left);
}

// Lanes of row jj kept by dropout: hash(seed, bh, i, j) >= threshold.
template <class V>
inline __attribute__((always_inline)) IntOf<V> keep_mask(const Tile& t, uint32_t row_hash, IntOf<V> lanes) {
  using VU = UintOf<V>;
  const VU i = (VU)lanes + t.i0;
  const VU x = lowbias32<VU>(lowbias32<VU>(row_hash ^ i) ^ t.bh_s1);
  return x >= t.threshold;  // -1 where kept
}

// ---------------------------------------------------------------------------- element-wise tiles
// The element-wise tile code comes in two instances: kGeneral handles masked tiles and dropout (flags read at
// run time); the other is the tight loop for interior tiles without dropout.
template <bool kGeneral>
inline __attribute__((always_inline)) uint32_t row_hash(const Tile& t, int64_t jj) {
  return kGeneral && t.dropout ? lowbias32<uint32_t>((t.j0 + static_cast<uint32_t>(jj)) ^ t.s0) : 0;
}

// e(S - base) of one row vector, dropout applied (e), its value before dropout added to sum.
template <class V, bool kGeneral>
inline __attribute__((always_inline)) V softmax_entry(const Tile& t, const float* row, int v, IntOf<V> lanes, V base,
                                                      uint32_t hash, V& sum) {
  V e = exp2v((loadv<V>(row + v * lanes_of<V>) - base) * kLog2e);
  sum += e;
  if (kGeneral && t.dropout) e = keep_mask<V>(t, hash, lanes) ? e * t.keep_scale : V{};
  return e;
}

// Forward, one tile of scores st (nk x kBQ): probabilities e(S - m) with dropout applied, as fp32
// in st or (kPairs, 16 lanes) as bf16 row pairs in `pairs`; updates the running max m (of S) and sum l and
// writes alpha = e(m_old - m_new), the factor out^T is rescaled by.
template <class V, bool kPairs, bool kGeneral>
inline __attribute__((always_inline)) void fwd_softmax_body(const Tile& t, float* __restrict st,
                                                            float* __restrict m, float* __restrict l,
                                                            float* __restrict alpha, uint32_t* __restrict pairs) {
  constexpr int NV = kVecs<V>;
  constexpr int64_t W = lanes_of<V>;
  const V ninf = splat<V>(-kInf);
  IntOf<V> lanes[NV];
  V mx[NV];
  for (int v = 0; v < NV; ++v) lanes[v] = lane_index<V>(v), mx[v] = ninf;
  // This pass only reads unless it must mask (masked scores are stored as -inf).
  const bool masked = kGeneral && t.masked;
  for (int64_t jj = 0; jj < t.nk; ++jj) {
    float* row = st + jj * kBQ;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V s = loadv<V>(row + v * W);
      if (masked) {
        s = band_mask<V>(t, jj, lanes[v]) ? s : ninf;
        storev(row + v * W, s);
      }
      mx[v] = s > mx[v] ? s : mx[v];
    }
  }
  V base[NV], sum[NV];
  for (int v = 0; v < NV; ++v) {
    const V m_old = loadv<V>(m + v * W);
    const V m_new = mx[v] > m_old ? mx[v] : m_old;
    base[v] = m_new == ninf ? V{} : m_new;  // rows without keys so far: e(-inf - 0) = 0, no NaN
    storev(alpha + v * W, exp2v((m_old - base[v]) * kLog2e));
    storev(m + v * W, m_new);
    sum[v] = V{};
  }
  for (int64_t jj = 0; jj < t.nk; jj += 2) {
    const bool two = jj + 1 < t.nk;
    const float* row0 = st + jj * kBQ;
    const float* row1 = row0 + kBQ;
    const uint32_t h0 = row_hash<kGeneral>(t, jj), h1 = row_hash<kGeneral>(t, jj + 1);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const V e0 = softmax_entry<V, kGeneral>(t, row0, v, lanes[v], base[v], h0, sum[v]);
      const V e1 = two ? softmax_entry<V, kGeneral>(t, row1, v, lanes[v], base[v], h1, sum[v]) : V{};
      if constexpr (kPairs) {
        store_pair(pairs + (jj / 2) * kBQ + v * W, e0, e1);
      } else {
        storev(st + jj * kBQ + v * W, e0);
        if (two) storev(st + (jj + 1) * kBQ + v * W, e1);
      }
    }
  }
  for (int v = 0; v < NV; ++v) storev(l + v * W, loadv<V>(l + v * W) * loadv<V>(alpha + v * W) + sum[v]);
}

inline bool general_tile(const Tile& t) { return t.masked || t.dropout; }

template <class V>
inline __attribute__((always_inline)) void fwd_softmax_f32_of(const Tile& t, float* st, float* m, float* l,
                                                              float* alpha) {
  if (general_tile(t)) {
    fwd_softmax_body<V, false, true>(t, st, m, l, alpha, nullptr);
  } else {
    fwd_softmax_body<V, false, false>(t, st, m, l, alpha, nullptr);
  }
}
// lanes: the fp32 vector width (Problem::lanes).
PYTRAIN_SIMD void fwd_softmax_f32(int lanes, const Tile& t, float* st, float* m, float* l, float* alpha) {
  if (lanes == 16) {
    fwd_softmax_f32_of<vf>(t, st, m, l, alpha);
  } else {
    fwd_softmax_f32_of<vf8>(t, st, m, l, alpha);
  }
}
PYTRAIN_SIMD void fwd_softmax_pairs(const Tile& t, float* st, float* m, float* l, float* alpha, uint32_t* pairs) {
  if (general_tile(t)) {
    fwd_softmax_body<vf, true, true>(t, st, m, l, alpha, pairs);
  } else {
    fwd_softmax_body<vf, true, false>(t, st, m, l, alpha, pairs);
  }
}

// Backward, one row vector: pd = P keep / (1 - p) (for dV) and ds = P (dP keep / (1 - p) - delta)
// (for dQ and dK, which get the softmax scale when written), with P = e(S - lse).
template <class V, bool kGeneral>
inline __attribute__((always_inline)) void ds_entry(const Tile& t, const float* srow, const float* drow, int64_t jj,
                                                    int v, IntOf<V> lanes, V lse, V delta, uint32_t hash, V& pd,
                                                    V& ds) {
  constexpr int64_t W = lanes_of<V>;
  V x = loadv<V>(srow + v * W) - lse;
  if (kGeneral && t.masked) x = band_mask<V>(t, jj, lanes) ? x : splat<V>(-kInf);
  const V pr = exp2v(x * kLog2e);
  V dp = loadv<V>(drow + v * W);
  pd = pr;
  if (kGeneral && t.dropout) {
    const IntOf<V> keep = keep_mask<V>(t, hash, lanes);
    pd = keep ? pr * t.keep_scale : V{};
    dp = keep ? dp * t.keep_scale : V{};
  }
  ds = pr * (dp - delta);
}

// fp32: st (scores) -> pd and dpt (dO v^T) -> ds, in place.
template <class V, bool kGeneral>
inline __attribute__((always_inline)) void bwd_ds_f32_body(const Tile& t, float* __restrict st,
                                                           float* __restrict dpt, const float* __restrict lse,
                                                           const float* __restrict delta) {
  constexpr int NV = kVecs<V>;
  constexpr int64_t W = lanes_of<V>;
  IntOf<V> lanes[NV];
  V ls[NV], dl[NV];
  for (int v = 0; v < NV; ++v) {
    lanes[v] = lane_index<V>(v), ls[v] = loadv<V>(lse + v * W), dl[v] = loadv<V>(delta + v * W);
  }
  for (int64_t jj = 0; jj < t.nk; ++jj) {
    float* srow = st + jj * kBQ;
    float* drow = dpt + jj * kBQ;
    const uint32_t h = row_hash<kGeneral>(t, jj);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V pd, ds;
      ds_entry<V, kGeneral>(t, srow, drow, jj, v, lanes[v], ls[v], dl[v], h, pd, ds);
      storev(srow + v * W, pd);
      storev(drow + v * W, ds);
    }
  }
}

template <class V>
inline __attribute__((always_inline)) void bwd_ds_f32_of(const Tile& t, float* st, float* dpt, const float* lse,
                                                         const float* delta) {
  if (general_tile(t)) {
    bwd_ds_f32_body<V, true>(t, st, dpt, lse, delta);
  } else {
    bwd_ds_f32_body<V, false>(t, st, dpt, lse, delta);
  }
}
PYTRAIN_SIMD void bwd_ds_f32(int lanes, const Tile& t, float* st, float* dpt, const float* lse, const float* delta) {
  if (lanes == 16) {
    bwd_ds_f32_of<vf>(t, st, dpt, lse, delta);
  } else {
    bwd_ds_f32_of<vf8>(t, st, dpt, lse, delta);
  }
}

// bf16: pd and ds straight into the GEMM operands: rows (nk x kBQ bf16; A of dV += pd dO and
// dK += ds q) and row pairs (ceil(nk / 2) x kBQ; B of dQ^T += k^T ds).
template <bool kGeneral, bool kRows, bool kPairs>
inline __attribute__((always_inline)) void bwd_ds_bf16_body(const Tile& t, const float* __restrict st,
                                                            const float* __restrict dpt, const float* __restrict lse,
                                                            const float* __restrict delta, uint16_t* __restrict p_rows,
                                                            uint16_t* __restrict ds_rows,
                                                            uint32_t* __restrict ds_pairs) {
  constexpr int NV = kVecs<vf>;
  vi lanes[NV];
  vf ls[NV], dl[NV];
  for (int v = 0; v < NV; ++v) {
    lanes[v] = lane_index<vf>(v), ls[v] = loadv(lse + v * kLanes), dl[v] = loadv(delta + v * kLanes);
  }
  for (int64_t jj = 0; jj < t.nk; jj += 2) {
    const bool two = jj + 1 < t.nk;
    const uint32_t h0 = row_hash<kGeneral>(t, jj), h1 = row_hash<kGeneral>(t, jj + 1);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vf pd0, ds0, pd1 = vf{}, ds1 = vf{};
      ds_entry<vf, kGeneral>(t, st + jj * kBQ, dpt + jj * kBQ, jj, v, lanes[v], ls[v], dl[v], h0, pd0, ds0);
      if (two) {
        ds_entry<vf, kGeneral>(t, st + (jj + 1) * kBQ, dpt + (jj + 1) * kBQ, jj + 1, v, lanes[v], ls[v], dl[v], h1,
                               pd1, ds1);
      }
      if constexpr (kRows) {
        store_bf16(p_rows + jj * kBQ + v * kLanes, pd0);
        store_bf16(ds_rows + jj * kBQ + v * kLanes, ds0);
        if (two) {
          store_bf16(p_rows + (jj + 1) * kBQ + v * kLanes, pd1);
          store_bf16(ds_rows + (jj + 1) * kBQ + v * kLanes, ds1);
        }
      }
      if constexpr (kPairs) store_pair(ds_pairs + (jj / 2) * kBQ + v * kLanes, ds0, ds1);
    }
  }
}

// rows / pairs: which outputs are needed (the general instance writes both).
PYTRAIN_SIMD void bwd_ds_bf16(const Tile& t, const float* st, const float* dpt, const float* lse, const float* delta,
                              uint16_t* p_rows, uint16_t* ds_rows, uint32_t* ds_pairs, bool rows, bool pairs) {
  if (general_tile(t)) {
    bwd_ds_bf16_body<true, true, true>(t, st, dpt, lse, delta, p_rows, ds_rows, ds_pairs);
  } else if (rows && pairs) {
    bwd_ds_bf16_body<false, true, true>(t, st, dpt, lse, delta, p_rows, ds_rows, ds_pairs);
  } else if (rows) {
    bwd_ds_bf16_body<false, true, false>(t, st, dpt, lse, delta, p_rows, ds_rows, ds_pairs);
  } else {
    bwd_ds_bf16_body<false, false, true>(t, st, dpt, lse, delta, p_rows, ds_rows, ds_pairs);
  }
}

// ---------------------------------------------------------------------------------- packing
// q block (nq rows of D floats) -> q^T (D x kBQ), lanes >= nq zero.
void transpose_f32(const float* __restrict src, int64_t nq, int64_t D, float* __restrict dst) {
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D; ++d) dst[d * kBQ + i] = src[i * D + d];
  if (nq < kBQ)
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBQ + nq, dst + (d + 1) * kBQ, 0.0f);
}

// nq rows of D floats -> kBQ rows of Dp floats, zero padded.
void pad_rows_f32(const float* src, int64_t nq, int64_t D, int64_t Dp, float* dst) {
  for (int64_t i = 0; i < kBQ; ++i) {
    if (i < nq) std::memcpy(dst + i * Dp, src + i * D, sizeof(float) * D);
    std::fill(dst + i * Dp + (i < nq ? D : 0), dst + (i + 1) * Dp, 0.0f);
  }
}

// bf16 q block -> pairs along d with queries in lanes: dst[(d / 2) * kBQ + i] = (q[i, d], q[i, d + 1]).
void transpose_pairs_bf16(const uint16_t* src, int64_t nq, int64_t D, uint32_t* dst) {
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D; d += 2) std::memcpy(dst + (d / 2) * kBQ + i, src + i * D + d, sizeof(uint32_t));
  if (nq < kBQ)
    for (int64_t d = 0; d < D; d += 2) std::fill(dst + (d / 2) * kBQ + nq, dst + (d / 2 + 1) * kBQ, 0u);
}

// Row pair (lo, hi) of bf16 -> dst[d] = (lo[d], hi[d]) for d < D (hi may be null: zeros), 0 up to ld.
PYTRAIN_SIMD void interleave_pair(const uint16_t* __restrict lo, const uint16_t* __restrict hi, int64_t D, int64_t ld,
                                  uint32_t* __restrict dst) {
  if (hi) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = uint32_t{lo[d]} | (uint32_t{hi[d]} << 16);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = uint32_t{lo[d]};
  }
  std::fill(dst + D, dst + ld, 0u);
}

// n rows of bf16 (D columns) -> out_pairs pairs of rows with columns in lanes (row stride ld), zero padded.
void interleave_rows_bf16(const uint16_t* src, int64_t n, int64_t D, int64_t ld, int64_t out_pairs, uint32_t* dst) {
  for (int64_t r = 0; r < 2 * out_pairs; r += 2) {
    if (r < n) {
      interleave_pair(src + r * D, r + 1 < n ? src + (r + 1) * D : nullptr, D, ld, dst + (r / 2) * ld);
    } else {
      std::fill(dst + (r / 2) * ld, dst + (r / 2 + 1) * ld, 0u);
    }
  }
}

// Dot products of fp32 / bf16 rows (order fixed by the code: deterministic).
PYTRAIN_SIMD float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
PYTRAIN_SIMD float dot_bf16(const uint16_t* __restrict a, const uint16_t* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += bits_to_f32(uint32_t{a[i]} << 16) * bits_to_f32(uint32_t{b[i]} << 16);
  return acc;
}

// vals[0, n) * mul -> dst[offset, offset + n) in dtype dt (vals is overwritten).
void store_row(float* vals, int64_t n, float mul, void* dst, at::ScalarType dt, int64_t offset) {
  if (mul != 1.0f)
    for (int64_t i = 0; i < n; ++i) vals[i] *= mul;
  if (dt == at::kFloat) {
    std::memcpy(static_cast<float*>(dst) + offset, vals, sizeof(float) * n);
  } else if (dt == at::kBFloat16) {
    f32_to_bf16(vals, static_cast<uint16_t*>(dst) + offset, n);
  } else {
    f32_to_f16(vals, static_cast<uint16_t*>(dst) + offset, n);
  }
}

// ------------------------------------------------------------------------------- scheduling
// Per-thread scratch, 64-byte aligned.
class Scratch {
 public:
  explicit Scratch(int64_t floats) : buf_(at::empty({std::max<int64_t>(floats, 1)}, at::kFloat)) {}
  float* data() { return buf_.data_ptr<float>(); }

 private:
  at::Tensor buf_;
};

// Runs f(item, scratch) for items [0, n), handed out dynamically to at::get_num_threads() threads
// (each item's result must not depend on which thread runs it).  amx: each thread hands back its AMX tile
// state (cpublas::brgemm_release) when done.
template <class F>
void run_items(int64_t n, int64_t scratch_floats, bool amx, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(scratch_floats);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      f(i, scratch.data());
    }
    if (amx) at::native::cpublas::brgemm_release();
  });
}

// Block indices [0, n) by decreasing cost (stable), for longest-first scheduling.
template <class Cost>
std::vector<int64_t> by_cost(int64_t n, const Cost& cost) {
  std::vector<int64_t> order(n), c(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i, c[i] = cost(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return c[a] > c[b]; });
  return order;
}

inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// ------------------------------------------------------------------------------------ inputs
Problem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k, double scale, bool causal,
                     int64_t window_left, int64_t window_right, double dropout_p,
                     const at::Tensor& seed_tensor) {
  check_attention_args(op, scale, window_left, window_right, dropout_p);
  const int64_t seed = read_attention_seed(op, seed_tensor);
  Problem p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.group = p.H / p.Hkv;
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  p.Dp = align16(p.D);
  p.nqb = (p.Lq + kBQ - 1) / kBQ;
  p.nkb = (p.Lk + kBK - 1) / kBK;
  p.off = p.Lk - p.Lq;
  p.left = window_left < 0 ? kUnbounded : window_left;
  const int64_t right = causal ? 0 : window_right;
  p.right = right < 0 ? kUnbounded : right;
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_p > 0.0;
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.threshold = static_cast<uint32_t>(std::min<double>(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  p.s0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffU);
  p.s1 = static_cast<uint32_t>((seed >> 32) & 0xffffffff);
  p.path = attention_path(op, q.scalar_type(), p.D);
  p.bf16dot = p.path != AttentionPath::kFp32;
  p.amx = p.path == AttentionPath::kAmx;
  p.lanes = fp32_lanes(op);
  p.Lkp = p.nkb * kBK;
  return p;
}

// Float32 view of an input for the float32 path (converted once; float32 tensors as they are).
at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }
const uint16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

// k or v of every (batch, kv head) -> bf16 x^T: [d * Lkp + j], keys Lk..Lkp zero (the A operand of
// out^T += v^T P^T and dQ^T += k^T dS^T, row-major for both bf16 paths).
at::Tensor keys_transposed(const Problem& p, const at::Tensor& x) {
  at::Tensor out = at::zeros({p.B * p.Hkv, p.D * p.Lkp}, at::kBFloat16);
  const uint16_t* src = bf16_ptr(x);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bk = lo; bk < hi; ++bk)
      for (int64_t j = 0; j < p.Lk; ++j)
        for (int64_t d = 0; d < p.D; ++d) dst[bk * p.D * p.Lkp + d * p.Lkp + j] = src[(bk * p.Lk + j) * p.D + d];
  });
  return out;
}

// ------------------------------------------------------------------------------------ forward
struct FwdArgs {
  Problem p;
  const float* qf = nullptr;  // float32 path
  const float* kf = nullptr;
  const float* vf = nullptr;
  const uint16_t* qb = nullptr;  // bf16 path
  const uint16_t* kb = nullptr;
  const uint16_t* vt = nullptr;      // v^T (keys_transposed)
  void* out = nullptr;               // (B, H, Lq, D) in dtype
  at::ScalarType dtype;
  float* lse = nullptr;
};

int64_t fwd_scratch_floats(const Problem& p) {
  return p.D * kBQ /* q^T */ + kBK * kBQ /* S */ + kBK / 2 * kBQ /* P pairs */ + p.D * kBQ /* out^T */ +
         3 * kBQ /* m, l, alpha */ + 256 /* output row */;
}

void fwd_block(const FwdArgs& a, int64_t bh, int64_t qb, float* ws) {
  const Problem& p = a.p;
  const int64_t b = bh / p.H, h = bh % p.H, bkv = b * p.Hkv + h / p.group;
  const int64_t i0 = qb * kBQ, nq = std::min(kBQ, p.Lq - i0), D = p.D;
  float* qt = ws;
  float* st = qt + D * kBQ;
  uint32_t* pp = reinterpret_cast<uint32_t*>(st + kBK * kBQ);
  float* ot = st + kBK * kBQ + kBK / 2 * kBQ;
  float* m = ot + D * kBQ;
  float* l = m + kBQ;
  float* alpha = l + kBQ;
  float* row = alpha + kBQ;
  std::fill(m, m + kBQ, -kInf);
  std::fill(l, l + kBQ, 0.0f);
  std::fill(ot, ot + D * kBQ, 0.0f);
  if (p.bf16dot) {
    transpose_pairs_bf16(a.qb + (bh * p.Lq + i0) * D, nq, D, reinterpret_cast<uint32_t*>(qt));
  } else {
    transpose_f32(a.qf + (bh * p.Lq + i0) * D, nq, D, qt);
  }
  const auto [kb_lo, kb_hi] = p.key_blocks(qb);
  for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
    const int64_t j0 = kb * kBK, nk = std::min(kBK, p.Lk - j0), kv_row = bkv * p.Lk + j0;
    const Tile t = make_tile(p, bh, i0, nq, j0, nk);
    if (p.bf16dot) {
      gemm_bf16_path(p.amx, nk, kBQ, D / 2, a.kb + kv_row * D, D, reinterpret_cast<const uint32_t*>(qt), kBQ, st,
                     kBQ, nullptr, false, p.scale);
      fwd_softmax_pairs(t, st, m, l, alpha, pp);
      gemm_bf16_path(p.amx, D, kBQ, (nk + 1) / 2, a.vt + bkv * D * p.Lkp + j0, p.Lkp, pp, kBQ, ot, kBQ, alpha, true);
    } else {
      gemm_f32(p.lanes, nk, kBQ, D, a.kf + kv_row * D, D, 1, qt, kBQ, st, kBQ, nullptr, false, p.scale);
      fwd_softmax_f32(p.lanes, t, st, m, l, alpha);
      gemm_f32(p.lanes, D, kBQ, nk, a.vf + kv_row * D, 1, D, st, kBQ, ot, kBQ, alpha, true);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const bool empty = l[i] == 0.0f;  // NaN sums stay NaN
    const float inv = empty ? 0.0f : 1.0f / l[i];
    a.lse[bh * p.Lq + i0 + i] = empty ? -kInf : m[i] + std::log2(l[i]) * kLn2;
    for (int64_t d = 0; d < D; ++d) row[d] = ot[d * kBQ + i] * inv;
    store_row(row, D, 1.0f, a.out, a.dtype, (bh * p.Lq + i0 + i) * D);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, bool causal, int64_t window_left,
                                                 int64_t window_right, double dropout_p, const at::Tensor& seed) {
  check_attention_qkv(kFwd, q, k, v);
  FwdArgs a;
  a.p = make_problem(kFwd, q, k, scale, causal, window_left, window_right, dropout_p, seed);
  const Problem& p = a.p;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  at::Tensor qf, kf, vf, vt;
  if (p.bf16dot) {
    a.qb = bf16_ptr(q);
    a.kb = bf16_ptr(k);
    vt = keys_transposed(p, v);
    a.vt = bf16_ptr(vt);
  } else {
    qf = as_f32(q), kf = as_f32(k), vf = as_f32(v);
    a.qf = qf.data_ptr<float>(), a.kf = kf.data_ptr<float>(), a.vf = vf.data_ptr<float>();
  }
  a.out = out.data_ptr();
  a.dtype = q.scalar_type();
  a.lse = lse.data_ptr<float>();
  const std::vector<int64_t> order = by_cost(p.nqb, [&](int64_t qb) {
    const auto [lo, hi] = p.key_blocks(qb);
    return hi - lo;
  });
  const int64_t BH = p.B * p.H;
  run_items(p.nqb * BH, fwd_scratch_floats(p), p.amx, [&](int64_t item, float* ws) {
    fwd_block(a, item % BH, order[item / BH], ws);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------------- backward
// The q side of one (batch, head, q block), packed once: q^T and dO^T with queries in lanes (fp32
// D x kBQ, or bf16 pairs along d), q and dO rows with d in lanes (fp32 kBQ x Dp, or bf16 pairs of
// rows), lse (+inf for rows without keys and padding), delta = rowsum(dO * out), and the fp32
// dQ^T accumulator.
struct QBlock {
  float* qt;
  float* dot;
  float* qr;
  float* dor;
  float* lse;
  float* delta;
  float* dqt;
};

struct QLayout {
  int64_t qt, row, total;  // floats
  explicit QLayout(const Problem& p)
      : qt(p.bf16dot ? p.D / 2 * kBQ : p.D * kBQ),
        row(p.bf16dot ? kBQ / 2 * p.Dp : kBQ * p.Dp),
        total(2 * qt + 2 * row + 2 * kBQ + p.D * kBQ) {}
  QBlock at(float* base) const {
    float* lse = base + 2 * qt + 2 * row;
    return {base, base + qt, base + 2 * qt, base + 2 * qt + row, lse, lse + kBQ, lse + 2 * kBQ};
  }
};

struct BwdArgs {
  Problem p;
  QLayout lay;
  const float* kf = nullptr;  // float32 path
  const float* vf = nullptr;
  const uint16_t* kb = nullptr;  // bf16 path
  const uint16_t* vb = nullptr;
  const uint16_t* kt = nullptr;      // k^T (keys_transposed)
  const void* q = nullptr;           // float32 (float32 path) or bf16
  const void* grad = nullptr;
  const void* out = nullptr;
  const float* lse = nullptr;
  void* dq = nullptr;  // outputs in dtype
  void* dk = nullptr;
  void* dv = nullptr;
  at::ScalarType dtype;
  explicit BwdArgs(const Problem& prob) : p(prob), lay(prob) {}
};

// Tile scratch: S, dP (fp32), bf16 P rows, dS rows, dS pairs, dK and dV accumulators, one output row.
int64_t bwd_scratch_floats(const Problem& p) { return 2 * kBK * kBQ + 3 * kBK * kBQ / 2 + 2 * kBK * p.Dp + 256; }

void bwd_prepare(const BwdArgs& a, int64_t bh, int64_t qb, const QBlock& blk) {
  const Problem& p = a.p;
  const int64_t i0 = qb * kBQ, nq = std::min(kBQ, p.Lq - i0), D = p.D, row0 = bh * p.Lq + i0;
  for (int64_t i = 0; i < kBQ; ++i) {
    const float s = i < nq ? a.lse[row0 + i] : -kInf;
    blk.lse[i] = s == -kInf ? kInf : s;
  }
  std::fill(blk.delta, blk.delta + kBQ, 0.0f);
  if (p.bf16dot) {
    const uint16_t* qs = static_cast<const uint16_t*>(a.q) + row0 * D;
    const uint16_t* gs = static_cast<const uint16_t*>(a.grad) + row0 * D;
    const uint16_t* os = static_cast<const uint16_t*>(a.out) + row0 * D;
    transpose_pairs_bf16(qs, nq, D, reinterpret_cast<uint32_t*>(blk.qt));
    transpose_pairs_bf16(gs, nq, D, reinterpret_cast<uint32_t*>(blk.dot));
    interleave_rows_bf16(qs, nq, D, p.Dp, kBQ / 2, reinterpret_cast<uint32_t*>(blk.qr));
    interleave_rows_bf16(gs, nq, D, p.Dp, kBQ / 2, reinterpret_cast<uint32_t*>(blk.dor));
    for (int64_t i = 0; i < nq; ++i) blk.delta[i] = dot_bf16(gs + i * D, os + i * D, D);
  } else {
    const float* qs = static_cast<const float*>(a.q) + row0 * D;
    const float* gs = static_cast<const float*>(a.grad) + row0 * D;
    const float* os = static_cast<const float*>(a.out) + row0 * D;
    transpose_f32(qs, nq, D, blk.qt);
    transpose_f32(gs, nq, D, blk.dot);
    pad_rows_f32(qs, nq, D, p.Dp, blk.qr);
    pad_rows_f32(gs, nq, D, p.Dp, blk.dor);
    for (int64_t i = 0; i < nq; ++i) blk.delta[i] = dot_f32(gs + i * D, os + i * D, D);
  }
  std::fill(blk.dqt, blk.dqt + D * kBQ, 0.0f);
}

// dQ^T of a finished block -> dq rows (times the softmax scale).
void bwd_store_dq(const BwdArgs& a, int64_t bh, int64_t qb, const QBlock& blk, float* row) {
  const Problem& p = a.p;
  const int64_t i0 = qb * kBQ, nq = std::min(kBQ, p.Lq - i0);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t d = 0; d < p.D; ++d) row[d] = blk.dqt[d * kBQ + i];
    store_row(row, p.D, p.scale, a.dq, a.dtype, (bh * p.Lq + i0 + i) * p.D);
  }
}

// One tile (head bh, q block qb, key block kb): rows of the key block's dK / dV accumulators
// (kBK x Dp) += and / or the q block's dQ^T +=.
void bwd_tile(const BwdArgs& a, const QBlock& blk, int64_t bh, int64_t qb, int64_t kb, float* ws, bool do_kv,
              bool do_q) {
  const Problem& p = a.p;
  const int64_t b = bh / p.H, h = bh % p.H, bkv = b * p.Hkv + h / p.group;
  const int64_t i0 = qb * kBQ, nq = std::min(kBQ, p.Lq - i0), j0 = kb * kBK, nk = std::min(kBK, p.Lk - j0);
  const int64_t D = p.D, Dp = p.Dp, kv_row = bkv * p.Lk + j0;
  float* st = ws;
  float* dpt = st + kBK * kBQ;
  uint16_t* p_rows = reinterpret_cast<uint16_t*>(dpt + kBK * kBQ);
  uint16_t* ds_rows = p_rows + kBK * kBQ;
  uint32_t* ds_pairs = reinterpret_cast<uint32_t*>(ds_rows + kBK * kBQ);
  float* dk_acc = reinterpret_cast<float*>(ds_pairs + kBK / 2 * kBQ);
  float* dv_acc = dk_acc + kBK * Dp;
  const Tile t = make_tile(p, bh, i0, nq, j0, nk);
  if (p.bf16dot) {
    gemm_bf16_path(p.amx, nk, kBQ, D / 2, a.kb + kv_row * D, D, reinterpret_cast<const uint32_t*>(blk.qt), kBQ, st,
                   kBQ, nullptr, false, p.scale);
    gemm_bf16_path(p.amx, nk, kBQ, D / 2, a.vb + kv_row * D, D, reinterpret_cast<const uint32_t*>(blk.dot), kBQ, dpt,
                   kBQ, nullptr, false);
    bwd_ds_bf16(t, st, dpt, blk.lse, blk.delta, p_rows, ds_rows, ds_pairs, do_kv, do_q);
    if (do_kv) {
      const int64_t q_pairs = (nq + 1) / 2;
      gemm_bf16_path(p.amx, nk, Dp, q_pairs, p_rows, kBQ, reinterpret_cast<const uint32_t*>(blk.dor), Dp, dv_acc, Dp,
                     nullptr, true);
      gemm_bf16_path(p.amx, nk, Dp, q_pairs, ds_rows, kBQ, reinterpret_cast<const uint32_t*>(blk.qr), Dp, dk_acc, Dp,
                     nullptr, true);
    }
    if (do_q) {
      gemm_bf16_path(p.amx, D, kBQ, (nk + 1) / 2, a.kt + bkv * D * p.Lkp + j0, p.Lkp, ds_pairs, kBQ, blk.dqt, kBQ,
                     nullptr, true);
    }
  } else {
    gemm_f32(p.lanes, nk, kBQ, D, a.kf + kv_row * D, D, 1, blk.qt, kBQ, st, kBQ, nullptr, false, p.scale);
    gemm_f32(p.lanes, nk, kBQ, D, a.vf + kv_row * D, D, 1, blk.dot, kBQ, dpt, kBQ, nullptr, false);
    bwd_ds_f32(p.lanes, t, st, dpt, blk.lse, blk.delta);
    if (do_kv) {
      gemm_f32(p.lanes, nk, Dp, nq, st, kBQ, 1, blk.dor, Dp, dv_acc, Dp, nullptr, true);
      gemm_f32(p.lanes, nk, Dp, nq, dpt, kBQ, 1, blk.qr, Dp, dk_acc, Dp, nullptr, true);
    }
    if (do_q) gemm_f32(p.lanes, D, kBQ, nk, a.kf + kv_row * D, 1, D, dpt, kBQ, blk.dqt, kBQ, nullptr, true);
  }
}

// dK and dV of key block kb of (batch, kv head) bkv: every head of the GQA group, every q block of the
// band (block_of(bh, qb) gives the packed q side), in that order; with do_q also their dQ^T.
template <class BlockOf>
void bwd_key_block(const BwdArgs& a, int64_t bkv, int64_t kb, float* ws, bool do_q, const BlockOf& block_of) {
  const Problem& p = a.p;
  const int64_t j0 = kb * kBK, nk = std::min(kBK, p.Lk - j0), Dp = p.Dp;
  float* dk_acc = ws + 2 * kBK * kBQ + 3 * kBK * kBQ / 2;
  float* dv_acc = dk_acc + kBK * Dp;
  float* row = dv_acc + kBK * Dp;
  std::fill(dk_acc, dk_acc + 2 * kBK * Dp, 0.0f);
  const auto [qb_lo, qb_hi] = p.query_blocks(kb);
  const int64_t b = bkv / p.Hkv, hkv = bkv % p.Hkv;
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t bh = b * p.H + hkv * p.group + g;
    for (int64_t qb = qb_lo; qb < qb_hi; ++qb) bwd_tile(a, block_of(bh, qb), bh, qb, kb, ws, true, do_q);
  }
  for (int64_t jj = 0; jj < nk; ++jj) {
    const int64_t offset = (bkv * p.Lk + j0 + jj) * p.D;
    std::memcpy(row, dk_acc + jj * Dp, sizeof(float) * p.D);
    store_row(row, p.D, p.scale, a.dk, a.dtype, offset);
    std::memcpy(row, dv_acc + jj * Dp, sizeof(float) * p.D);
    store_row(row, p.D, 1.0f, a.dv, a.dtype, offset);
  }
}

// One sweep per (batch, kv head) doing dQ, dK and dV, when there are enough of them for the threads.
bool fused_backward(const Problem& p) {
  const int64_t units = p.B * p.Hkv, threads = std::max<int64_t>(1, at::get_num_threads());
  if (units < threads) return false;
  const int64_t rounds = (units + threads - 1) / threads;
  return 4 * units >= 3 * rounds * threads;  // at least 75% of the thread-rounds busy
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             double scale, bool causal, int64_t window_left,
                                                             int64_t window_right, double dropout_p,
                                                             const at::Tensor& seed) {
  check_attention_qkv(kBwd, q, k, v);
  check_attention_like(kBwd, "grad_out", grad_out, q, q.scalar_type(), q.sizes());
  check_attention_like(kBwd, "out", out, q, q.scalar_type(), q.sizes());
  check_attention_like(kBwd, "lse", lse, q, at::kFloat, {q.size(0), q.size(1), q.size(2)});
  BwdArgs a(make_problem(kBwd, q, k, scale, causal, window_left, window_right, dropout_p, seed));
  const Problem& p = a.p;
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  a.dtype = q.scalar_type();
  a.lse = lse.data_ptr<float>();
  at::Tensor qf, kf, vf, gf, of, kt;
  if (p.bf16dot) {
    a.q = q.data_ptr(), a.grad = grad_out.data_ptr(), a.out = out.data_ptr();
    a.kb = bf16_ptr(k), a.vb = bf16_ptr(v);
    kt = keys_transposed(p, k);
    a.kt = bf16_ptr(kt);
  } else {
    qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), gf = as_f32(grad_out), of = as_f32(out);
    a.q = qf.data_ptr(), a.grad = gf.data_ptr(), a.out = of.data_ptr();
    a.kf = kf.data_ptr<float>(), a.vf = vf.data_ptr<float>();
  }
  const int64_t BKV = p.B * p.Hkv, BH = p.B * p.H, tile_ws = bwd_scratch_floats(p);
  const QLayout& lay = a.lay;
  if (fused_backward(p)) {
    // Per thread: tile scratch, then the packed q side of the group's heads (reused across items).
    const int64_t local_blocks = p.group * p.nqb;
    run_items(BKV, tile_ws + local_blocks * lay.total, p.amx, [&](int64_t bkv, float* ws) {
      float* local = ws + tile_ws;
      const int64_t h0 = (bkv / p.Hkv) * p.H + (bkv % p.Hkv) * p.group;  // first head of the group (b * H + h)
      auto block_of = [&](int64_t bh, int64_t qb) { return lay.at(local + ((bh - h0) * p.nqb + qb) * lay.total); };
      for (int64_t g = 0; g < p.group; ++g)
        for (int64_t qb = 0; qb < p.nqb; ++qb) bwd_prepare(a, h0 + g, qb, block_of(h0 + g, qb));
      for (int64_t kb = 0; kb < p.nkb; ++kb) bwd_key_block(a, bkv, kb, ws, /*do_q=*/true, block_of);
      float* row = ws + tile_ws - 256;
      for (int64_t g = 0; g < p.group; ++g)
        for (int64_t qb = 0; qb < p.nqb; ++qb) bwd_store_dq(a, h0 + g, qb, block_of(h0 + g, qb), row);
    });
    return {dq, dk, dv};
  }
  // Split: dK / dV items (batch, kv head, key block) and dQ items (batch, head, q block), costliest
  // first, over q sides packed up front.
  at::Tensor packed = at::empty({BH * p.nqb * lay.total}, q.options().dtype(at::kFloat));
  float* base = packed.data_ptr<float>();
  auto block_of = [&](int64_t bh, int64_t qb) { return lay.at(base + (bh * p.nqb + qb) * lay.total); };
  at::parallel_for(0, BH * p.nqb, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) bwd_prepare(a, i / p.nqb, i % p.nqb, block_of(i / p.nqb, i % p.nqb));
  });
  const std::vector<int64_t> kb_order = by_cost(p.nkb, [&](int64_t kb) {
    const auto [lo, hi] = p.query_blocks(kb);
    return hi - lo;
  });
  const std::vector<int64_t> qb_order = by_cost(p.nqb, [&](int64_t qb) {
    const auto [lo, hi] = p.key_blocks(qb);
    return hi - lo;
  });
  const int64_t kv_items = p.nkb * BKV;
  run_items(kv_items + p.nqb * BH, tile_ws, p.amx, [&](int64_t item, float* ws) {
    if (item < kv_items) {
      bwd_key_block(a, item % BKV, kb_order[item / BKV], ws, /*do_q=*/false, block_of);
    } else {
      item -= kv_items;
      const int64_t bh = item % BH, qb = qb_order[item / BH];
      const auto [kb_lo, kb_hi] = p.key_blocks(qb);
      for (int64_t kb = kb_lo; kb < kb_hi; ++kb) bwd_tile(a, block_of(bh, qb), bh, qb, kb, ws, false, true);
    }
  });
  at::parallel_for(0, BH * p.nqb, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> row(p.D);
    for (int64_t i = lo; i < hi; ++i) bwd_store_dq(a, i / p.nqb, i % p.nqb, block_of(i / p.nqb, i % p.nqb), row.data());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace pytrain::cpu
