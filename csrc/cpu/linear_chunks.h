// The 16-lane row helpers of the fused linear losses' CPU row passes (csrc/cpu/linear_cross_entropy.cpp,
// csrc/cpu/linear_distillation_loss.cpp): partial loads / stores at a row's end, e^x and a lane sum.  The chunk
// walk around the row passes (logits GEMM, then the gradient GEMMs) is csrc/linear_chunks.h's, shared with the
// CUDA kernels; the CUDA row helpers are csrc/cuda/linear_chunks.cuh, Triton's kernels/linear_chunks.py.
#pragma once

#include <cstring>

#include "../linear_chunks.h"  // the walk (a plain "linear_chunks.h" would name this file)
#include "cpu/simd.h"

namespace pytrain::cpu {

constexpr float kLog2e = 1.4426950408889634f;

// Lanes [0, n) of a 16-lane block at p; the others `fill`.
inline __attribute__((always_inline)) vf load_part(const float* p, int64_t n, float fill) {
  if (n >= kLanes) return loadv(p);
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? p[i] : fill;
  return loadv(buf);
}
inline __attribute__((always_inline)) void store_part(float* p, int64_t n, vf v) {
  if (n >= kLanes) return storev(p, v);
  float buf[kLanes];
  storev(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}
inline __attribute__((always_inline)) vf exp_v(vf x) { return exp2v(x * kLog2e); }

// Sum of the 16 lanes.
inline __attribute__((always_inline)) float hsum(vf v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

}  // namespace pytrain::cpu
