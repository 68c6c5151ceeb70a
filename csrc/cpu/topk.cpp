// pytrain::topk_filter for CPU tensors: the memory-bound pass of top-k sparsification.
//
//   indices = { i : |x_i| >= t or x_i is NaN } in ascending order,  values = x[indices]
//
// (one test: !(|x_i| < t), which is also true for NaN).  Reference: pytrain/testing/compress_ref.py; the
// threshold t comes from a sample (Deep Gradient Compression, Lin et al. 2018; see pytrain/comm/topk.py).
// One read of x: the flattened tensor is cut into kChunk-element chunks filtered in parallel into per-chunk
// index lists, which are then concatenated in chunk order (so the result does not depend on the thread count)
// and the kept values gathered.
// Within a chunk, AVX-512 (when the CPU has it) compares 16 floats at a time and compress-stores the selected
// indices; the generic path counts hits per 16-element group with SIMD, skips groups without one (most of them
// at a 1% ratio) and compacts the others without branches.  bfloat16 / float16 are widened to
// float32 a tile at a time (exact), so the comparison is the same float32 test for every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/multi_tensor.h"
#include "topk_checks.h"

namespace pytrain::cpu {
namespace {

constexpr int64_t kGroup = 16;  // elements per hit test: one AVX-512 vector
constexpr int64_t kSlack = 8;   // room past the last entry for full-vector stores of compressed indices

// Generic path.  Writes base + i for the selected entries of v[0, n) to out (room for n + kSlack entries);
// returns the count.  A SIMD count per group skips groups without a hit; hit groups are compacted without branches.
PYTRAIN_SIMD int64_t compact_generic(const float* __restrict v, int64_t n, float t, int64_t base,
                                     int64_t* __restrict out) {
  int64_t c = 0;
  for (int64_t g = 0; g < n; g += kGroup) {
    const int64_t len = std::min(kGroup, n - g);
    int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
    for (int64_t i = 0; i < len; ++i) hits += !(std::fabs(v[g + i]) < t);
    if (hits == 0) continue;
    for (int64_t i = 0; i < len; ++i) {
      out[c] = base + g + i;
      c += !(std::fabs(v[g + i]) < t);
    }
  }
  return c;
}

#if defined(__GNUC__) && defined(__x86_64__)
// AVX-512 path: one masked compare (not-less-than, unordered: NaN is selected) and two in-register compressions
// of int64 indices per 16 floats, each stored as a full vector (`out` has kSlack entries of room past n; a
// compressing store to memory is microcoded and slow on AMD Zen 4); the generic path finishes the tail.
__attribute__((target("avx512f"))) int64_t compact_avx512(const float* v, int64_t n, float t, int64_t base,
                                                          int64_t* out) {
  const __m512 thr = _mm512_set1_ps(t);
  const __m512i step = _mm512_set1_epi64(16);
  __m512i lo = _mm512_add_epi64(_mm512_set1_epi64(base), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8));
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(v + i));
    const __mmask16 k = _mm512_cmp_ps_mask(a, thr, _CMP_NLT_UQ);
    if (k) {
      const __mmask8 k_lo = static_cast<__mmask8>(k), k_hi = static_cast<__mmask8>(k >> 8);
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi64(k_lo, lo));
      c += __builtin_popcount(k_lo);
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi64(k_hi, hi));
      c += __builtin_popcount(k_hi);
    }
    lo = _mm512_add_epi64(lo, step);
    hi = _mm512_add_epi64(hi, step);
  }
  return c + compact_generic(v + i, n - i, t, base + i, out + c);
}
#endif

int64_t compact(const float* v, int64_t n, float t, int64_t base, int64_t* out) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return compact_avx512(v, n, t, base, out);
#endif
  return compact_generic(v, n, t, base, out);
}

// The selected indices of chunk [begin, begin + size) of x, appended to `out`.
void filter_chunk(const F32Tiles& x, int64_t begin, int64_t size, float t, std::vector<int64_t>& out) {
  alignas(64) float buf[kTile];
  thread_local std::vector<int64_t> scratch;
  scratch.resize(kChunk + kSlack);
  const int64_t tile = tile_size(size, x.in_place());
  int64_t count = 0;
  for (int64_t off = 0; off < size; off += tile) {
    const int64_t n = std::min(tile, size - off);
    count += compact(x.load(begin + off, n, buf), n, t, begin + off, scratch.data() + count);
  }
  out.assign(scratch.begin(), scratch.begin() + count);
}

// values[j] = x[indices[j]], copying elements of `Elem` bytes (float32: 4, bfloat16 / float16: 2).
template <class Elem>
void gather(const void* x, const int64_t* idx, int64_t count, void* values) {
  const Elem* src = static_cast<const Elem*>(x);
  Elem* dst = static_cast<Elem*>(values);
  for (int64_t j = 0; j < count; ++j) dst[j] = src[idx[j]];
}

std::tuple<at::Tensor, at::Tensor> topk_filter(const at::Tensor& x, double threshold) {
  check_topk_args(x, threshold, c10::DeviceType::CPU);
  const int64_t n = x.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const float t = static_cast<float>(threshold);
  const F32Tiles tiles(x);
  std::vector<std::vector<int64_t>> found(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) filter_chunk(tiles, c * kChunk, std::min(kChunk, n - c * kChunk), t, found[c]);
  });
  std::vector<int64_t> offsets(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) offsets[c + 1] = offsets[c] + static_cast<int64_t>(found[c].size());
  at::Tensor indices = at::empty({offsets[chunks]}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({offsets[chunks]}, x.options());
  int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t elem = x.element_size();
  char* vals = static_cast<char*>(values.data_ptr());
  auto place = [&](int64_t lo, int64_t hi) {  // chunks [lo, hi): indices to their slots, values gathered
    for (int64_t c = lo; c < hi; ++c) {
      std::copy(found[c].begin(), found[c].end(), idx + offsets[c]);
      const int64_t count = offsets[c + 1] - offsets[c];
      if (elem == 4) {
        gather<uint32_t>(x.data_ptr(), idx + offsets[c], count, vals + 4 * offsets[c]);
      } else {
        gather<uint16_t>(x.data_ptr(), idx + offsets[c], count, vals + 2 * offsets[c]);
      }
    }
  };
  // Few kept entries (the usual ~ratio of x): serially, as on a busy machine a parallel region can wait a time
  // slice for a descheduled thread.
  if (offsets[chunks] <= kChunk) {
    place(0, chunks);
  } else {
    at::parallel_for(0, chunks, 1, place);
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("topk_filter", &topk_filter); }

}  // namespace pytrain::cpu
