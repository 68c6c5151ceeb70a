// Shared machinery of the CPU multi-tensor kernels (adamw.cpp, lars.cpp, lamb.cpp, global_norm.cpp).
//
// * Chunks: each tensor of a list is cut into chunks of kChunk elements, a multiple of the int8 state
//   block so that a block never straddles two chunks.  ChunkPlan::run spreads chunks over
//   at::get_num_threads() threads (at::parallel_for) in contiguous runs of about equal element
//   counts.  Reductions keep one partial per chunk and add them per tensor in chunk order, so their
//   results do not depend on the number of threads.
// * Tiles: the element loops work on fp32 arrays.  float32 tensors are used in place; bfloat16 and
//   float16 tensors are converted kTile elements at a time into stack buffers and back, with
//   round-to-nearest-even bit arithmetic that matches torch's casts exactly and vectorizes.
// * SIMD: the element loops are plain contiguous loops under `#pragma omp simd`, compiled three
//   times through GCC function multiversioning (PYTRAIN_SIMD): AVX-512 (x86-64-v4), AVX2 + FMA
//   (x86-64-v3) and baseline x86-64; the dynamic loader picks the clone for the running CPU.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "int8_states.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYTRAIN_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYTRAIN_SIMD
#endif

namespace pytrain::cpu {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per chunk: 256 KiB of fp32, fits L2
constexpr int64_t kTile = kInt8Block;          // elements per fp32 scratch tile (and per int8 block)
constexpr int64_t kMinPerThread = int64_t{1} << 15;  // below this many elements per thread, use fewer threads
static_assert(kChunk % kInt8Block == 0, "int8 blocks must not straddle chunks");

// ------------------------------------------------------------------------ fp32 <-> bf16 / fp16
inline float bits_to_f32(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t f32_to_bits(float x) { return __builtin_bit_cast(uint32_t, x); }

// cond ? a : b with masks: a ternary on a float-derived value could stay a branch (GCC does not
// speculate floating-point operations under -ftrapping-math), which stops vectorization.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// bfloat16 is the upper half of a float32.
PYTRAIN_SIMD inline void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_f32(uint32_t{src[i]} << 16);
}

// Round to nearest even on the 16 dropped bits; NaN becomes the canonical quiet NaN (as c10::BFloat16).
PYTRAIN_SIMD inline void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = f32_to_bits(src[i]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

// IEEE half -> single: rebias normal exponents (15 -> 127), keep inf/NaN payloads, and take
// subnormals as mantissa * 2^-24 (exact in float32).
PYTRAIN_SIMD inline void f16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i];
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t mag = h & 0x7fffu;
    const uint32_t normal = (mag << 13) + 0x38000000u;
    const uint32_t inf_nan = (mag << 13) | 0x7f800000u;
    const uint32_t subnormal = f32_to_bits(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
    dst[i] = bits_to_f32(sign | select_bits(mag >= 0x7c00u, inf_nan, select_bits(mag >= 0x0400u, normal, subnormal)));
  }
}

// IEEE single -> half, round to nearest even, in integer arithmetic only (a float operation feeding
// a select may stay a branch under -ftrapping-math and stop vectorization).  Normal halves: rebias
// the exponent and round away 13 mantissa bits.  Below 2^-14 the code is the significand (implicit
// bit included) shifted right by 126 - exponent, rounded to nearest even.  Overflow gives inf, NaN
// a quiet NaN.
PYTRAIN_SIMD inline void f32_to_f16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = f32_to_bits(src[i]);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t abs_bits = u & 0x7fffffffu;
    const uint32_t rebiased = abs_bits - 0x38000000u;
    const uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;
    const uint32_t significand = (abs_bits & 0x007fffffu) | 0x00800000u;
    const uint32_t shift = std::min(126u - (abs_bits >> 23), 31u);  // >= 14 where used; 31 flushes to 0
    const uint32_t kept = significand >> shift;
    const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    const uint32_t subnormal = kept + (rest > half || (rest == half && (kept & 1u)) ? 1u : 0u);
    const uint32_t mag = abs_bits > 0x7f800000u    ? 0x7e00u    // NaN
                         : abs_bits >= 0x477ff000u ? 0x7c00u    // >= 65520 rounds to inf
                         : abs_bits >= 0x38800000u ? normal     // >= 2^-14: normal half
                                                   : subnormal;
    dst[i] = static_cast<uint16_t>(sign | mag);
  }
}

// One tensor's elements seen as fp32 tiles: float32 tensors in place, others converted.
class F32Tiles {
 public:
  explicit F32Tiles(const at::Tensor& t) : data_(static_cast<char*>(t.data_ptr())), dtype_(t.scalar_type()) {}

  bool in_place() const { return dtype_ == at::kFloat; }

  // fp32 values of elements [begin, begin + n): the tensor's memory for float32, else `scratch`.
  float* load(int64_t begin, int64_t n, float* scratch) const {
    if (in_place()) return reinterpret_cast<float*>(data_) + begin;
    const uint16_t* src = reinterpret_cast<const uint16_t*>(data_) + begin;
    if (dtype_ == at::kBFloat16) {
      bf16_to_f32(src, scratch, n);
    } else {
      f16_to_f32(src, scratch, n);
    }
    return scratch;
  }

  // Writes fp32 `vals` to elements [begin, begin + n), rounding to the tensor's dtype.  Nothing to do
  // when `vals` came from load() of a float32 tensor (updated in place).
  void store(int64_t begin, int64_t n, const float* vals) const {
    if (in_place()) {
      float* dst = reinterpret_cast<float*>(data_) + begin;
      if (dst != vals) std::memcpy(dst, vals, n * sizeof(float));
      return;
    }
    uint16_t* dst = reinterpret_cast<uint16_t*>(data_) + begin;
    if (dtype_ == at::kBFloat16) {
      f32_to_bf16(vals, dst, n);
    } else {
      f32_to_f16(vals, dst, n);
    }
  }

 private:
  char* data_;
  at::ScalarType dtype_;
};

// Elements per tile for a chunk of `size` elements: the whole chunk when every operand is used in
// place (no scratch needed), else one scratch tile.
inline int64_t tile_size(int64_t size, bool all_in_place) { return all_in_place ? size : kTile; }

// ----------------------------------------------------------------------------------- reductions
// Sum of squares in double (the order is fixed by the loop and the clone, so runs repeat bit for bit).
PYTRAIN_SIMD inline double sum_squares(const float* __restrict x, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return acc;
}

// --------------------------------------------------------------------------------------- chunks
struct Chunk {
  int64_t tensor;  // index in the tensor list
  int64_t begin;   // first element in the tensor
  int64_t size;    // number of elements
};

class ChunkPlan {
 public:
  explicit ChunkPlan(at::TensorList tensors) : first_chunk_(tensors.size() + 1, 0), start_(1, 0) {
    for (size_t t = 0; t < tensors.size(); ++t) {
      const int64_t n = tensors[t].numel();
      for (int64_t begin = 0; begin < n; begin += kChunk) {
        chunks_.push_back({static_cast<int64_t>(t), begin, std::min(kChunk, n - begin)});
        start_.push_back(start_.back() + chunks_.back().size);
      }
      first_chunk_[t + 1] = static_cast<int64_t>(chunks_.size());
    }
  }

  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // Elements in all chunks before chunk i (i = num_chunks(): all elements).
  int64_t start(int64_t i) const { return start_[i]; }
  int64_t num_tensors() const { return static_cast<int64_t>(first_chunk_.size()) - 1; }

  // Calls f(i, chunk i) for the chunks i in [lo, hi), in parallel.  Each thread takes a contiguous
  // run of about equal element count, always the same for the same [lo, hi) and thread count; with
  // `reverse` it walks its run backwards, so a second pass over data just touched by a forward pass
  // starts with what is still in cache.
  template <class F>
  void run(int64_t lo, int64_t hi, const F& f, bool reverse = false) const {
    const int64_t total = start_[hi] - start_[lo];
    if (total == 0) return;
    const int64_t threads = std::clamp<int64_t>(total / kMinPerThread, 1, at::get_num_threads());
    auto first_of = [&](int64_t thread) {  // first chunk starting in this thread's share of elements
      const int64_t target = start_[lo] + total * thread / threads;
      return static_cast<int64_t>(std::lower_bound(start_.begin() + lo, start_.begin() + hi, target) - start_.begin());
    };
    auto run_thread = [&](int64_t thread) {
      const int64_t a = first_of(thread), b = first_of(thread + 1);
      for (int64_t k = 0; k < b - a; ++k) {
        const int64_t i = reverse ? b - 1 - k : a + k;
        f(i, chunks_[i]);
      }
    };
    if (threads == 1) {
      run_thread(0);
      return;
    }
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run_thread(t);
    });
  }

  template <class F>
  void run_all(const F& f) const { run(0, num_chunks(), f); }

  // Sum of the per-chunk partials of one tensor, added in chunk order.
  double tensor_sum(const std::vector<double>& partials, int64_t tensor) const {
    double sum = 0.0;
    for (int64_t i = first_chunk_[tensor]; i < first_chunk_[tensor + 1]; ++i) sum += partials[i];
    return sum;
  }

  // Cuts the list into batches of consecutive tensors of about `budget_bytes` (at least one tensor
  // each), as chunk ranges [lo, hi) and tensor ranges.  Two-pass kernels run both passes on one
  // batch before the next, so the second pass finds the batch in cache.
  struct Batch {
    int64_t first_tensor, last_tensor;  // tensors [first_tensor, last_tensor)
    int64_t lo, hi;                     // chunks [lo, hi)
  };
  std::vector<Batch> batches(int64_t bytes_per_element, int64_t budget_bytes) const {
    std::vector<Batch> out;
    int64_t first = 0;
    for (int64_t t = 0; t < num_tensors(); ++t) {
      const int64_t bytes = (start_[first_chunk_[t + 1]] - start_[first_chunk_[first]]) * bytes_per_element;
      const bool next_would_overflow =
          t + 1 < num_tensors() &&
          bytes + (start_[first_chunk_[t + 2]] - start_[first_chunk_[t + 1]]) * bytes_per_element > budget_bytes;
      if (t + 1 == num_tensors() || next_would_overflow) {
        out.push_back({first, t + 1, first_chunk_[first], first_chunk_[t + 1]});
        first = t + 1;
      }
    }
    return out;
  }

 private:
  std::vector<Chunk> chunks_;
  std::vector<int64_t> first_chunk_;  // per tensor, its first chunk; then the number of chunks
  std::vector<int64_t> start_;        // per chunk, elements in all chunks before it; then the total
};

// Working-set budget of the two-pass kernels: half the last-level cache (the rest is left to the
// streams that pass through it and to other data).
inline int64_t cache_batch_budget() {
  static const int64_t budget = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return static_cast<int64_t>(l3 > 0 ? l3 : 32L << 20) / 2;
  }();
  return budget;
}

}  // namespace pytrain::cpu
