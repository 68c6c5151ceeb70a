// fp32 / int32 vectors (GCC vector extensions) of 16 lanes (vf: one zmm) and 8 lanes (vf8: one ymm) and their
// helpers for the CPU attention and fused-loss kernels (csrc/cpu/attention.cpp, attention_tile.h,
// linear_chunks.h): loads and stores, broadcasts, a vectorized 2^x, and rounding to bfloat16 (single rows, or
// row pairs in the layout of a vdpbf16ps operand).  Every helper is always_inline, so it is compiled for the ISA
// of the target_clones clone that uses it.  Code for CPUs without AVX-512 uses the 8-lane types: there GCC
// keeps 64-byte vectors on the stack, and every operation on them goes through memory.
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only cross inlined helpers

namespace pytrain::cpu {

constexpr int64_t kLanes = 16;  // fp32 lanes of one vector

// GCC vector extensions of W fp32 / int32 / uint32 lanes; each target_clones clone lowers them to its ISA.
template <int W>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
};
using vf = Lanes<16>::f;
using vi = Lanes<16>::i;
using vu = Lanes<16>::u;
using vf8 = Lanes<8>::f;
typedef uint16_t vh __attribute__((vector_size(32)));  // 16 bf16

// The lane count of a float vector V, and its int32 / uint32 vectors of as many lanes.
template <class V>
constexpr int64_t lanes_of = sizeof(V) / sizeof(float);
template <class V>
using IntOf = typename Lanes<lanes_of<V>>::i;
template <class V>
using UintOf = typename Lanes<lanes_of<V>>::u;

template <class V = vf>
inline __attribute__((always_inline)) V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline __attribute__((always_inline)) void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
// For loop-invariant values only: GCC builds it with an add and a broadcast (0 + x does not fold, since
// 0 + -0 = +0); in hot loops write scalar * vector, which becomes a single vbroadcastss.
template <class V = vf>
inline __attribute__((always_inline)) V splat(float x) {
  return V{} + x;
}

// 2^x, NaN propagating.  x is clamped to [-127, 128]: at -127, 2^n (n = round(x)) has a zero exponent field
// and so gives exactly 0 (2^-inf = 0, what masked scores need); at 128 an all-ones one, +inf (an exponent
// past 8 bits would wrap into the sign and give garbage).  On [-0.5, 0.5] the
// fraction goes through the Cephes exp2f polynomial (relative error ~2e-7).
template <class V>
inline __attribute__((always_inline)) V exp2v(V x) {
  x = x < -127.0f ? splat<V>(-127.0f) : x;  // NaN compares false and stays NaN
  x = x > 128.0f ? splat<V>(128.0f) : x;
  const V n = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const V f = x - n;
  V p = splat<V>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const IntOf<V> e = (__builtin_convertvector(n, IntOf<V>) + 127) << 23;
  return p * (V)e;
}

// float32 -> bfloat16 bits, round to nearest even (finite values), in the low 16 bits of each lane.
inline __attribute__((always_inline)) vu bf16_bits(vf x) {
  const vu u = (vu)x;
  return (u + 0x7fffU + ((u >> 16) & 1U)) >> 16;
}

inline __attribute__((always_inline)) void store_bf16(uint16_t* dst, vf x) {
  const vh h = __builtin_convertvector(bf16_bits(x), vh);
  std::memcpy(dst, &h, sizeof h);
}
// Two fp32 rows as bf16 pairs (lo, hi) per lane, the layout of a vdpbf16ps B operand.
inline __attribute__((always_inline)) void store_pair(uint32_t* dst, vf lo, vf hi) {
  const vu pair = bf16_bits(lo) | (bf16_bits(hi) << 16);
  std::memcpy(dst, &pair, sizeof pair);
}

}  // namespace pytrain::cpu
