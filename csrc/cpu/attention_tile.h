// The GEMMs of one CPU attention tile (csrc/cpu/attention.cpp): one register-blocked micro-kernel, templated on
// how the operands are multiplied (Dot: fp32 FMAs with broadcast scalars, or bf16 pairs through vdpbf16ps),
// the drivers gemm_f32 / gemm_bf16 that cut a product into micro-kernel blocks, and gemm_bf16_path, which runs a
// bf16 product either through gemm_bf16 or through PyTorch's blocked GEMM (cpublas::brgemm: AMX tiles).
//
// C[M x N] (=, +=) A[M x K] B[K x N]: A(r, k) = A[r * sar + k * sak] broadcast, B row k = 16-lane vectors at
// B + k * ldb, C row r at C + r * ldc; N a multiple of 16.  With accumulate, C is first multiplied lane-wise by
// cscale (if given): the online-softmax rescale of out^T rides on the load.  Without, C = out_scale * (A B),
// the product rounded to fp32 on its own before the store (the attention scores scale * q k^T: stored, so
// never contracted into an FMA with the softmax's subtraction).  Accumulation is in fp32, k
// ascending, one accumulator per (row, vector): the order, and so every result bit, is fixed by the code.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/attention_isa.h"
#include "cpu/multi_tensor.h"  // PYTRAIN_SIMD
#include "cpu/simd.h"

namespace pytrain::cpu {

// A Dot says how one k step adds into the accumulators: Vec is its fp32 accumulator vector (kWidth lanes), A and B
// its operand element types, BVec a loaded B vector of kWidth lanes, Scalar a broadcast A element;
// madd(acc, a, b) returns acc + a * b.
template <class Vec>
inline __attribute__((always_inline)) Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class Vec>
inline __attribute__((always_inline)) void store_vec(float* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}

template <class Dot, int MR, int NV>
inline __attribute__((always_inline)) void micro_kernel(int64_t K, const typename Dot::A* A, int64_t sar, int64_t sak,
                                                        const typename Dot::B* B, int64_t ldb, float* C, int64_t ldc,
                                                        const float* cscale, bool accumulate, float out_scale) {
  using Vec = typename Dot::Vec;
  constexpr int64_t W = Dot::kWidth;
  Vec acc[MR][NV];
  if (accumulate && cscale) {
    Vec cs[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) cs[v] = load_vec<Vec>(cscale + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = load_vec<Vec>(C + r * ldc + v * W) * cs[v];
  } else if (accumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = load_vec<Vec>(C + r * ldc + v * W);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const typename Dot::B* b = B + k * ldb;
    const typename Dot::A* a = A + k * sak;
    typename Dot::BVec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Dot::load_b(b + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename Dot::Scalar ar = Dot::broadcast(a + r * sar);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Dot::madd(acc[r][v], ar, bv[v]);
    }
  }
  if (out_scale != 1.0f) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] * out_scale;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_vec(C + r * ldc + v * W, acc[r][v]);
}

// fp32 operands: FMAs of a broadcast scalar and B vectors of Vec (16 lanes: zmm; 8 lanes: ymm).
template <class V>
struct F32DotOf {
  using Vec = V;
  static constexpr int64_t kWidth = sizeof(V) / sizeof(float);
  using A = float;
  using B = float;
  using BVec = V;
  using Scalar = float;
  static inline __attribute__((always_inline)) V load_b(const float* b) { return load_vec<V>(b); }
  static inline __attribute__((always_inline)) float broadcast(const float* a) { return *a; }
  // scalar * vector: one vbroadcastss (a splat() of the scalar would not be)
  static inline __attribute__((always_inline)) V madd(V acc, float a, V b) { return acc + a * b; }
};
using F32Dot = F32DotOf<vf>;    // 16 lanes: AVX-512
using F32Dot8 = F32DotOf<vf8>;  // 8 lanes: AVX2 (cpu/simd.h)

// The last `rest` (< R + 1) rows of a row-blocked loop, as one block of exactly `rest` rows.
template <int R, class Block>
inline __attribute__((always_inline)) void tail_rows(int64_t rest, int64_t r, const Block& block) {
  if constexpr (R > 0) {
    if (rest == R) {
      block(std::integral_constant<int, R>{}, r);
    } else {
      tail_rows<R - 1>(rest, r, block);
    }
  }
}

// Rows [0, M) in blocks of MR, the remainder with one smaller block.
template <int MR, class Block>
inline __attribute__((always_inline)) void row_blocks(int64_t M, const Block& block) {
  int64_t r = 0;
  for (; r + MR <= M; r += MR) block(std::integral_constant<int, MR>{}, r);
  tail_rows<MR - 1>(M - r, r, block);
}

// Register blocking: a micro-kernel block keeps MR x NV accumulator vectors (the Dot's Vec) in registers.
// Column chunks of up to 4 vectors, each chunk's rows in blocks of rows(vectors):
//   Wide (AVX-512: 32 zmm of 16 lanes): 6 / 8 / 12 rows for 4 / 3 / 1-2 vectors: 24 accumulators, the B vectors
//   and the broadcast in the other 8.
//   Narrow (AVX2: 16 ymm of 8 lanes, with F32Dot8): 3 / 4 / 6 / 12 rows for
//   4 / 3 / 2 / 1 vectors: 12 accumulators, the B vectors and the broadcast in the other 4.
// The blocking changes which registers hold which sums, never their order: every result bit is the same.
struct WideBlocking {
  static constexpr int rows(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : 12; }
};
struct NarrowBlocking {
  static constexpr int rows(int nv) { return 12 / nv; }
};

// Columns [n0, n0 + NV vectors) of C, their rows in blocks of Blocking::rows(NV).
template <class Blocking, int NV, class BlockFn>
inline __attribute__((always_inline)) void column_chunk(int64_t M, int64_t n0, const BlockFn& fn) {
  row_blocks<Blocking::rows(NV)>(M, [&](auto mr, int64_t r) { fn(mr, std::integral_constant<int, NV>{}, r, n0); });
}

// The whole C[M x N] (=, +=) A B with micro_kernel<Dot> blocks (N a multiple of Dot::kWidth).
template <class Dot, class Blocking>
inline __attribute__((always_inline)) void gemm(int64_t M, int64_t N, int64_t K, const typename Dot::A* A,
                                                int64_t sar, int64_t sak, const typename Dot::B* B, int64_t ldb,
                                                float* C, int64_t ldc, const float* cscale, bool accumulate,
                                                float out_scale) {
  auto block = [&](auto mr, auto nv, int64_t r, int64_t n0) {
    micro_kernel<Dot, decltype(mr)::value, decltype(nv)::value>(K, A + r * sar, sar, sak, B + n0, ldb,
                                                                C + r * ldc + n0, ldc, cscale ? cscale + n0 : nullptr,
                                                                accumulate, out_scale);
  };
  for (int64_t n0 = 0; n0 < N; n0 += 4 * Dot::kWidth) {
    switch (std::min<int64_t>(4, (N - n0) / Dot::kWidth)) {
      case 4: column_chunk<Blocking, 4>(M, n0, block); break;
      case 3: column_chunk<Blocking, 3>(M, n0, block); break;
      case 2: column_chunk<Blocking, 2>(M, n0, block); break;
      default: column_chunk<Blocking, 1>(M, n0, block); break;
    }
  }
}

// lanes: 16 (F32Dot, WideBlocking: the AVX-512 register file) or 8 (F32Dot8, NarrowBlocking: AVX2's); see
// fp32_lanes in cpu/attention_isa.h.  flatten: the driver's lambdas must be compiled inside each clone, not for
// the default target.
PYTRAIN_SIMD __attribute__((flatten)) inline void gemm_f32(int lanes, int64_t M, int64_t N, int64_t K,
                                                           const float* A, int64_t sar, int64_t sak, const float* B,
                                                           int64_t ldb, float* C, int64_t ldc, const float* cscale,
                                                           bool accumulate, float out_scale = 1.0f) {
  if (lanes == 16) {
    gemm<F32Dot, WideBlocking>(M, N, K, A, sar, sak, B, ldb, C, ldc, cscale, accumulate, out_scale);
  } else {
    gemm<F32Dot8, NarrowBlocking>(M, N, K, A, sar, sak, B, ldb, C, ldc, cscale, accumulate, out_scale);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYTRAIN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")  // for the lambdas of gemm_bf16

// bf16 pairs: K counts pairs; A(r, k) is the 32-bit pair at A + r * sar + k * sak (bf16 units), B row k holds
// 16 lanes of pairs (uint32).  vdpbf16ps adds both products of a pair into the fp32 lane.  Not always_inline:
// the target mismatch with the micro-kernel's own (default) target forbids it; gemm_bf16's flatten inlines them.
struct Bf16Dot {
  using Vec = vf;
  static constexpr int64_t kWidth = kLanes;
  using A = uint16_t;
  using B = uint32_t;
  using BVec = __m512i;
  using Scalar = __m512i;
  static inline __m512i load_b(const uint32_t* b) { return _mm512_loadu_si512(b); }
  static inline __m512i broadcast(const uint16_t* a) {
    uint32_t pair;
    std::memcpy(&pair, a, sizeof pair);
    return _mm512_set1_epi32(static_cast<int>(pair));
  }
  static inline vf madd(vf acc, __m512i a, __m512i b) {
    return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
  }
};

PYTRAIN_BF16_TARGET __attribute__((flatten)) inline void gemm_bf16(int64_t M, int64_t N, int64_t K,
                                                                    const uint16_t* A, int64_t sar, int64_t sak,
                                                                    const uint32_t* B, int64_t ldb, float* C,
                                                                    int64_t ldc, const float* cscale,
                                                                    bool accumulate, float out_scale = 1.0f) {
  gemm<Bf16Dot, WideBlocking>(M, N, K, A, sar, sak, B, ldb, C, ldc, cscale, accumulate, out_scale);
}

#pragma GCC pop_options

#else
inline void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
                      int64_t, const float*, bool, float = 1.0f) {
  TORCH_CHECK(false, "attention: bf16 dot products are not compiled in");
}
#endif

// C[r, n] = C[r, n] * colscale[n] (colscale given) and then * s, rows [0, M), columns [0, N).
PYTRAIN_SIMD inline void scale_tile(float* C, int64_t M, int64_t N, int64_t ldc, const float* colscale, float s) {
  for (int64_t r = 0; r < M; ++r) {
    float* c = C + r * ldc;
    if (colscale) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] *= colscale[n];
    }
    if (s != 1.0f) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] *= s;
    }
  }
}

// The bf16 GEMMs of attention, A row-major (A(r, k) = A[r * lda + k], bf16), B bf16 pairs along k (VNNI: K pairs
// rows of ldb uint32), C fp32, K counted in pairs; cscale / out_scale as in gemm_bf16.  amx: PyTorch's blocked
// GEMM (oneDNN brgemm on AMX tiles), with the rescale of C before and the output scale after it as separate
// passes (the rounding is the same: scale * fl(A B)); otherwise pytrain's vdpbf16ps micro-kernel.
inline void gemm_bf16_path(bool amx, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                           const uint32_t* B, int64_t ldb, float* C, int64_t ldc, const float* cscale,
                           bool accumulate, float out_scale = 1.0f) {
  if (!amx) {
    gemm_bf16(M, N, K, A, lda, 2, B, ldb, C, ldc, cscale, accumulate, out_scale);
    return;
  }
  if (accumulate && cscale) scale_tile(C, M, N, ldc, cscale, 1.0f);
  at::native::cpublas::brgemm(M, N, 2 * K, lda, ldb, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
  if (out_scale != 1.0f) scale_tile(C, M, N, ldc, nullptr, out_scale);
}

}  // namespace pytrain::cpu
