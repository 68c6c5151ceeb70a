// The lowbias32 integer hash of C. Wellons, the source of pytrain's counter-based random bits (stochastic
// rounding in quantize, the dropout mask of attention; references: pytrain/testing/quant_ref.py and
// attention_ref.py).  One definition for the CPU kernels (on uint32_t or on GCC vectors of them) and the CUDA
// kernels (constexpr: callable from device code under --expt-relaxed-constexpr).
#pragma once

namespace pytrain {

template <class T>
inline __attribute__((always_inline)) constexpr T lowbias32(T x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

}  // namespace pytrain
