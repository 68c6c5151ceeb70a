// The 8-bit formats of pytrain::quantize / pytrain::dequantize (contract: pytrain/testing/quant_ref.py), shared
// by csrc/cpu/quantize.cpp and csrc/cuda/quantize.cu: format codes, code dtypes, largest codes, group counts,
// the fp32 bit patterns the absmax works on and the random bits of stochastic rounding.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "lowbias32.h"

namespace pytrain::quant {

enum Format : int { kInt8 = 0, kE4M3 = 1, kE5M2 = 2 };

inline at::ScalarType code_dtype(Format f) {
  return f == kInt8 ? at::kChar : f == kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
}

// Largest magnitude of a code: the qmax of scale = amax / qmax.
constexpr float format_max(Format f) { return f == kInt8 ? 127.0f : f == kE4M3 ? 448.0f : 57344.0f; }

constexpr int64_t num_groups(int64_t numel, int64_t group_size) { return (numel + group_size - 1) / group_size; }

constexpr uint32_t kAbsMask = 0x7fffffffu;  // fp32 bits of |x|: an integer max of them is the absmax
constexpr uint32_t kInfBits = 0x7f800000u;  // |x| bits at or above: inf or NaN

// Stochastic rounding of element `index`: 24 random bits from the hash of (index, seed = s1:s0).
constexpr uint32_t stochastic_u24(uint64_t index, uint32_t s0, uint32_t s1) {
  return lowbias32<uint32_t>(lowbias32<uint32_t>(static_cast<uint32_t>(index) ^ s0) ^
                             static_cast<uint32_t>(index >> 32) ^ s1) >>
         8;
}

}  // namespace pytrain::quant
