// The int8 optimizer-state format (contract: INT8_BLOCK and the int8 section of pytrain/testing/optim_ref.py),
// shared by the CPU and CUDA kernels: m as int8 codes times a per-block scale max |m| / kInt8MomentMax, r =
// sqrt(v) as uint8 codes on the zero-free grid (code + 1) times a per-block scale max r / kInt8RootGrid.
#pragma once

#include <cstdint>

namespace pytrain {

constexpr int64_t kInt8Block = 256;       // consecutive elements per quantization block (one scale each)
constexpr float kInt8MomentMax = 127.0f;  // largest |code| of m
constexpr float kInt8RootGrid = 256.0f;   // grid points of r: codes 0..255 stand for 1..256 steps

// Number of blocks of the int8 optimizer states for a tensor of n elements.
constexpr int64_t int8_blocks(int64_t n) { return (n + kInt8Block - 1) / kInt8Block; }

}  // namespace pytrain
