// Which GEMM path the CPU attention kernels (csrc/cpu/attention.cpp) take, chosen at run time per call:
//   "amx"          bfloat16 inputs, through PyTorch's blocked GEMM at::native::cpublas::brgemm with B in the
//                  VNNI (bf16 pair) layout; oneDNN runs it on AMX tiles.  Only where oneDNN can pack bf16 for
//                  AMX (cpublas::could_pack: Sapphire Rapids and later, oneDNN enabled in torch).
//   "avx512_bf16"  bfloat16 inputs, pytrain's own register-blocked vdpbf16ps micro-kernel (attention_tile.h):
//                  Zen 4 / Cooper Lake and later without AMX.
//   "fp32"         everything else (float32, float16, bfloat16 on older CPUs or odd head dims): fp32 FMAs,
//                  compiled for AVX-512, AVX2 + FMA and baseline x86-64 (the loader picks the clone).
// PYTRAIN_CPU_ATTENTION_PATH=amx|avx512_bf16|fp32 forces the path of bfloat16 inputs (tests use it to run every
// path this CPU can run); a forced path the CPU cannot run is an error, never a silent fallback.
//
// The fp32 path's vectors: 16 lanes (zmm, 24-accumulator blocking) where the CPU has AVX-512, else 8 lanes (ymm,
// 12 accumulators).  PYTRAIN_CPU_FP32_LANES=16|8 forces a width.  Both run on every x86-64 CPU (16 lanes without
// AVX-512 only slowly, through the stack) and give the same bits: the width decides which registers hold the
// sums, never their order.  Tests use it to compare the two on one machine.
#pragma once

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace pytrain::cpu {

enum class AttentionPath { kFp32, kBf16Dot, kAmx };

inline const char* attention_path_name(AttentionPath p) {
  switch (p) {
    case AttentionPath::kAmx: return "amx";
    case AttentionPath::kBf16Dot: return "avx512_bf16";
    default: return "fp32";
  }
}

inline bool cpu_has_bf16dot() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
#else
  return false;
#endif
}

// The fp32 vector width (16 or 8 lanes) for op, read once per call.
inline int fp32_lanes(const char* op) {
  const char* forced = std::getenv("PYTRAIN_CPU_FP32_LANES");
  if (forced == nullptr || *forced == '\0' || std::string(forced) == "auto") return cpu_has_avx512f() ? 16 : 8;
  if (std::string(forced) == "16") return 16;
  if (std::string(forced) == "8") return 8;
  TORCH_CHECK(false, op, ": PYTRAIN_CPU_FP32_LANES must be one of auto, 16, 8; got '", forced, "'");
  return 8;  // not reached: TORCH_CHECK(false) throws
}

// AMX through oneDNN: asked at each call (torch.backends.mkldnn can be switched off at run time).
inline bool cpu_has_amx_bf16() {
#if defined(__x86_64__)
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

inline bool attention_path_runs(AttentionPath p) {
  switch (p) {
    case AttentionPath::kAmx: return cpu_has_amx_bf16();
    case AttentionPath::kBf16Dot: return cpu_has_bf16dot();
    default: return true;
  }
}

// The path for inputs of dtype with head dim D (the bf16 paths pair elements along D: D must be even).
inline AttentionPath attention_path(const char* op, at::ScalarType dtype, int64_t D) {
  if (dtype != at::kBFloat16 || D % 2 != 0) return AttentionPath::kFp32;
  const char* forced = std::getenv("PYTRAIN_CPU_ATTENTION_PATH");
  if (forced == nullptr || *forced == '\0' || std::string(forced) == "auto") {
    if (cpu_has_amx_bf16()) return AttentionPath::kAmx;
    return cpu_has_bf16dot() ? AttentionPath::kBf16Dot : AttentionPath::kFp32;
  }
  for (AttentionPath p : {AttentionPath::kAmx, AttentionPath::kBf16Dot, AttentionPath::kFp32}) {
    if (std::string(forced) != attention_path_name(p)) continue;
    TORCH_CHECK(attention_path_runs(p), op, ": PYTRAIN_CPU_ATTENTION_PATH=", forced,
                " but this CPU cannot run that path (amx needs AMX-BF16 through oneDNN, avx512_bf16 needs "
                "AVX512_BF16)");
    return p;
  }
  TORCH_CHECK(false, op, ": PYTRAIN_CPU_ATTENTION_PATH must be one of auto, amx, avx512_bf16, fp32; got '", forced,
              "'");
  return AttentionPath::kFp32;  // not reached: TORCH_CHECK(false) throws
}

}  // namespace pytrain::cpu
