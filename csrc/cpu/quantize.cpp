// pytrain::quantize and pytrain::dequantize for CPU tensors: 8-bit codes (int8, fp8 e4m3 / e5m2) with one
// float32 scale per group of `group_size` consecutive elements (the last group partial).
//
// Per group (contract: pytrain/testing/quant_ref.py):
//   amax = max |x|;  non-finite group -> scale NaN, codes 0;  amax < qmax * 2^-126 -> scale 0, codes 0;
//   else scale = amax / qmax, inv = qmax / amax, y = x * inv,
//   int8: code = clamp(rint(y), -127, 127)  (or stochastic: r = rint(y), d = y - r,
//         code = r + sign(d) * (u24 < |d| 2^24), u24 from the lowbias32 hash of (index, seed));
//   fp8:  code = round-to-nearest-even saturating cast of y, in integer arithmetic (below).
// dequantize: out = decode(code) * scale, rounded to the output dtype.
//
// One pass over memory: a group of up to kChunk elements is read once from memory for its absmax
// (integer max of the magnitude bits: NaN and inf sort above every finite value, so one max also
// flags non-finite groups), then cast while still in cache.  Larger groups (per-tensor scales) are
// cut into chunk-sized pieces: absmax of all pieces in parallel, then the casts.
// The fp8 cast: normal results round the fp32 significand to M bits by adding half an ulp minus one
// plus the kept lsb (ties to even) and shifting; results below the smallest normal add a "magic"
// power of two whose ulp is the fp8 subnormal step, so the float adder rounds to nearest even there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>

#include "cpu/multi_tensor.h"
#include "quantize_checks.h"

namespace pytrain::cpu {
namespace {

using quant::kAbsMask;
using quant::kInfBits;

// An fp8 format with M mantissa bits and exponent bias B; codes at or above kSpecial (magnitude) are
// inf/NaN: e4m3fn has only NaN (0x7f), e5m2 has inf (0x7c) and NaNs.
template <int M, int B, uint32_t kMaxCode, uint32_t kSpecial>
struct Fp8 {
  static constexpr uint32_t kShift = 23 - M;
  static constexpr uint32_t kMinNormalBits = uint32_t{127 - B + 1} << 23;
  static constexpr uint32_t kMaxBits = ((uint32_t{127 - B} + (kMaxCode >> M)) << 23) | ((kMaxCode & ((1u << M) - 1)) << kShift);
  static constexpr uint32_t kMagicBits = uint32_t{127 - B + 23 - M + 1} << 23;  // ulp = 2^(1 - B - M)
  static constexpr float kSubnormalStep = __builtin_bit_cast(float, uint32_t{127 + 1 - B - M} << 23);

  // |y| (as fp32 bits, finite) -> fp8 magnitude code, round to nearest even, saturating at kMaxCode.
  static inline uint32_t encode(uint32_t a) {
    const uint32_t normal = ((a + ((1u << (kShift - 1)) - 1u) + ((a >> kShift) & 1u)) >> kShift) - (uint32_t{127 - B} << M);
    const uint32_t subnormal = f32_to_bits(bits_to_f32(a) + bits_to_f32(kMagicBits)) - kMagicBits;
    return select_bits(a >= kMaxBits, kMaxCode, select_bits(a >= kMinNormalBits, normal, subnormal));
  }

  static inline float decode(uint8_t code) {
    const uint32_t sign = uint32_t{code & 0x80u} << 24;
    const uint32_t mag = code & 0x7fu;
    const uint32_t normal = (mag << kShift) + (uint32_t{127 - B} << 23);
    const uint32_t special = kSpecial == 0x7fu ? 0x7fc00000u : (mag << kShift) | kInfBits;
    const uint32_t subnormal = f32_to_bits(static_cast<float>(static_cast<int32_t>(mag)) * kSubnormalStep);
    return bits_to_f32(sign | select_bits(mag >= kSpecial, special, select_bits(mag >= (1u << M), normal, subnormal)));
  }
};
using E4M3 = Fp8<3, 7, 0x7eu, 0x7fu>;   // max 448
using E5M2 = Fp8<2, 15, 0x7bu, 0x7cu>;  // max 57344

using quant::Format;
using quant::format_max;

// ------------------------------------------------------------------------------- element loops
PYTRAIN_SIMD uint32_t absmax_bits(const float* __restrict x, int64_t n) {
  uint32_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = f32_to_bits(x[i]) & kAbsMask;
    m = a > m ? a : m;
  }
  return m;
}

// No clamp needed: |x| <= amax, so |y| <= 127 (1 + 2^-24)^2 < 127.5 and rint(y) is in [-127, 127].
PYTRAIN_SIMD void cast_int8(const float* __restrict x, int8_t* __restrict q, int64_t n, float inv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(static_cast<int32_t>(std::rint(x[i] * inv)));
}

// `first`: flat index of x[0], the counter of the hash.  y = x * inv goes through a buffer so that
// d = y - r uses the rounded product: GCC contracts x * inv - r into an FMA in C++ otherwise.
PYTRAIN_SIMD void cast_int8_stochastic(const float* __restrict x, int8_t* __restrict q, int64_t n, float inv,
                                       int64_t first, uint32_t s0, uint32_t s1) {
  alignas(64) float y[kTile];
  for (int64_t base = 0; base < n; base += kTile) {
    const int64_t m = std::min(kTile, n - base);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) y[i] = x[base + i] * inv;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t u24 = quant::stochastic_u24(static_cast<uint64_t>(first + base + i), s0, s1);
      const float r = std::rint(y[i]);
      const float d = y[i] - r;
      const float up = static_cast<float>(static_cast<int32_t>(static_cast<float>(static_cast<int32_t>(u24)) < std::fabs(d) * 0x1p24f));
      const int32_t c = static_cast<int32_t>(r + std::copysign(up, d));  // 127 + 1 possible: clamp
      q[base + i] = static_cast<int8_t>(std::min(std::max(c, -127), 127));
    }
  }
}

template <class F>
PYTRAIN_SIMD void cast_fp8(const float* __restrict x, uint8_t* __restrict q, int64_t n, float inv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = f32_to_bits(x[i] * inv);
    q[i] = static_cast<uint8_t>(((u >> 24) & 0x80u) | F::encode(u & kAbsMask));
  }
}

template <class F>
PYTRAIN_SIMD void decode_fp8(const uint8_t* __restrict q, float* __restrict out, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = F::decode(q[i]) * scale;
}

PYTRAIN_SIMD void decode_int8(const int8_t* __restrict q, float* __restrict out, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * scale;
}

// out = decode(q) * scale for n codes of format `fmt` (each product rounded to fp32).
void decode(Format fmt, const void* q, int64_t n, float scale, float* out) {
  switch (fmt) {
    case quant::kInt8: decode_int8(static_cast<const int8_t*>(q), out, n, scale); break;
    case quant::kE4M3: decode_fp8<E4M3>(static_cast<const uint8_t*>(q), out, n, scale); break;
    case quant::kE5M2: decode_fp8<E5M2>(static_cast<const uint8_t*>(q), out, n, scale); break;
  }
}

// Error-feedback and mean loops.  Each product / difference / sum is stored before the next operation reads
// it (separate loops over memory): GCC would otherwise contract a * b - c into an FMA, which rounds once
// where the reference rounds twice.
PYTRAIN_SIMD void add_to(const float* __restrict x, float* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = x[i] + acc[i];
}

PYTRAIN_SIMD void subtract_from(float* __restrict acc, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] - x[i];
}

PYTRAIN_SIMD void divide(float* __restrict acc, int64_t n, float d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] / d;
}

PYTRAIN_SIMD void scaled_difference(const float* __restrict a, const float* __restrict b, float* __restrict out,
                                    int64_t n, float w) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w * (a[i] - b[i]);
}

// ------------------------------------------------------------------------------- sources
// What a quantization job quantizes, as fp32 values of elements [begin, begin + n) of one group: first() is
// called once per element (for the absmax), again() for the cast unless the group is one tile (its first()
// values are then cast); tile(n) is the most elements one call may ask for.  After the cast, feedback(begin, n, values, decoded) sees the values and their dequantized
// codes (sources with kFeedback only).

// quantize(x): x in place (float32) or converted a tile at a time.
struct PlainSource {
  static constexpr bool kFeedback = false;
  F32Tiles x;
  int64_t tile(int64_t n) const { return tile_size(n, x.in_place()); }
  const float* first(int64_t begin, int64_t n, float* buf) const { return x.load(begin, n, buf); }
  const float* again(int64_t begin, int64_t n, float* buf) const { return x.load(begin, n, buf); }
  void feedback(int64_t, int64_t, const float*, const float*) const {}
};

// quantize_into with error feedback: r := x + r on first(), quantized from r, then r := r - dequantized.
struct ResidualSource {
  static constexpr bool kFeedback = true;
  F32Tiles x;
  float* r;
  int64_t tile(int64_t) const { return kTile; }
  const float* first(int64_t begin, int64_t n, float* buf) const {
    add_to(x.load(begin, n, buf), r + begin, n);
    return r + begin;
  }
  const float* again(int64_t begin, int64_t, float*) const { return r + begin; }
  void feedback(int64_t begin, int64_t n, const float*, const float* decoded) const {
    subtract_from(r + begin, decoded, n);
  }
};

// requantize_mean: a = (sum of the rows' dequantized values, in row order) / rows, recomputed on each call;
// the residual's first m elements gain rows * (a - dequantized).
struct MeanSource {
  static constexpr bool kFeedback = true;
  Format fmt;
  const char* data;    // row w at data + w * row_stride
  int64_t row_stride;  // bytes (one per code)
  const float* scales;  // row w's group g at scales[w * scale_stride + g]
  int64_t scale_stride, rows, group;
  float* r;  // nullptr: no residual
  int64_t m;

  int64_t tile(int64_t) const { return kTile; }
  const float* first(int64_t begin, int64_t n, float* buf) const {
    alignas(64) float row[kTile];
    const int64_t g = begin / group;
    decode(fmt, data + begin, n, scales[g], buf);
    for (int64_t w = 1; w < rows; ++w) {
      decode(fmt, data + w * row_stride + begin, n, scales[w * scale_stride + g], row);
      add_to(row, buf, n);
    }
    divide(buf, n, static_cast<float>(rows));
    return buf;
  }
  const float* again(int64_t begin, int64_t n, float* buf) const { return first(begin, n, buf); }
  void feedback(int64_t begin, int64_t n, const float* values, const float* decoded) const {
    const int64_t k = std::min(n, m - begin);
    if (r == nullptr || k <= 0) return;
    alignas(64) float error[kTile];
    scaled_difference(values, decoded, error, k, static_cast<float>(rows));
    add_to(error, r + begin, k);
  }
};

// ------------------------------------------------------------------------------- groups
struct GroupScale {
  float scale;  // stored scale: amax / qmax, 0 (zero / tiny group) or NaN (non-finite group)
  float inv;    // qmax / amax, or 0 when the codes are all 0
};

GroupScale group_scale(uint32_t amax_bits, float qmax) {
  if (amax_bits >= kInfBits) return {std::numeric_limits<float>::quiet_NaN(), 0.0f};
  const float amax = bits_to_f32(amax_bits);
  if (amax < qmax * 0x1p-126f) return {0.0f, 0.0f};
  return {amax / qmax, qmax / amax};
}

template <class Source>
struct QuantizeJob {
  Source src;
  Format fmt;
  bool stochastic;
  uint32_t s0, s1;
  char* codes;
  float* scales;
  int64_t numel, group;

  uint32_t absmax(int64_t begin, int64_t n) const {
    alignas(64) float buf[kTile];
    uint32_t m = 0;
    const int64_t step = src.tile(n);
    for (int64_t off = 0; off < n; off += step) {
      const int64_t k = std::min(step, n - off);
      m = std::max(m, absmax_bits(src.first(begin + off, k, buf), k));
    }
    return m;
  }

  // Codes of elements [first, first + k) from their fp32 values x (k <= src.tile()), then the feedback.
  void cast_values(int64_t first, int64_t k, GroupScale s, const float* x) const {
    void* q = codes + first;
    if (s.inv == 0.0f) {
      std::memset(q, 0, k);
    } else {
      switch (fmt) {
        case quant::kInt8:
          if (stochastic) {
            cast_int8_stochastic(x, static_cast<int8_t*>(q), k, s.inv, first, s0, s1);
          } else {
            cast_int8(x, static_cast<int8_t*>(q), k, s.inv);
          }
          break;
        case quant::kE4M3: cast_fp8<E4M3>(x, static_cast<uint8_t*>(q), k, s.inv); break;
        case quant::kE5M2: cast_fp8<E5M2>(x, static_cast<uint8_t*>(q), k, s.inv); break;
      }
    }
    if constexpr (Source::kFeedback) {
      alignas(64) float decoded[kTile];
      decode(fmt, q, k, s.scale, decoded);
      src.feedback(first, k, x, decoded);
    }
  }

  void cast(int64_t begin, int64_t n, GroupScale s) const {
    alignas(64) float buf[kTile];
    const int64_t step = src.tile(n);
    for (int64_t off = 0; off < n; off += step) {
      const int64_t k = std::min(step, n - off);
      cast_values(begin + off, k, s, src.again(begin + off, k, buf));
    }
  }

  int64_t group_end(int64_t g) const { return std::min(numel, (g + 1) * group); }

  void run() const {
    if (group <= kChunk) {
      run_fused();
    } else {
      run_pieces();
    }
  }

  // Groups of at most kChunk elements: absmax, scale and cast of each group in one visit (a group of one tile
  // is read, or computed, once).
  void run_fused() const {
    const int64_t groups = quant::num_groups(numel, group);
    const float qmax = format_max(fmt);
    at::parallel_for(0, groups, std::max<int64_t>(1, kChunk / group), [&](int64_t g0, int64_t g1) {
      alignas(64) float buf[kTile];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t begin = g * group, n = group_end(g) - begin;
        if (n <= src.tile(n)) {  // one tile: its values serve the absmax and the cast
          const float* x = src.first(begin, n, buf);
          const GroupScale s = group_scale(absmax_bits(x, n), qmax);
          scales[g] = s.scale;
          cast_values(begin, n, s, x);
          continue;
        }
        const GroupScale s = group_scale(absmax(begin, n), qmax);
        scales[g] = s.scale;
        cast(begin, n, s);
      }
    });
  }

  // Larger groups: pieces of kChunk elements (a group's last piece may be shorter), absmax of every
  // piece in parallel, one scale per group, then every piece cast in parallel.
  void run_pieces() const {
    const int64_t groups = quant::num_groups(numel, group), per_group = quant::num_groups(group, kChunk);
    auto piece = [&](int64_t p, int64_t& begin, int64_t& n) {
      const int64_t g = p / per_group;
      begin = g * group + (p % per_group) * kChunk;
      n = std::max<int64_t>(0, std::min(kChunk, group_end(g) - begin));
    };
    std::vector<uint32_t> piece_max(groups * per_group, 0);
    at::parallel_for(0, groups * per_group, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0, begin, n; p < p1; ++p) {
        piece(p, begin, n);
        piece_max[p] = absmax(begin, n);
      }
    });
    std::vector<GroupScale> scale(groups);
    for (int64_t g = 0; g < groups; ++g) {
      const auto first = piece_max.begin() + g * per_group;
      scale[g] = group_scale(*std::max_element(first, first + per_group), format_max(fmt));
      scales[g] = scale[g].scale;
    }
    at::parallel_for(0, groups * per_group, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0, begin, n; p < p1; ++p) {
        piece(p, begin, n);
        cast(begin, n, scale[p / per_group]);
      }
    });
  }
};

template <class Source>
void run_job(const Source& src, Format fmt, bool stochastic, int64_t seed, void* codes, float* scales, int64_t numel,
             int64_t group) {
  if (numel == 0) return;
  const uint64_t s = static_cast<uint64_t>(seed);
  const QuantizeJob<Source> job{src, fmt, stochastic, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                                static_cast<char*>(codes), scales, numel, group};
  job.run();
}

std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, c10::string_view fmt_name, int64_t group_size,
                                                bool stochastic, int64_t seed) {
  const Format fmt = quant::check_quantize_args(x, std::string_view(fmt_name.data(), fmt_name.size()), group_size,
                                                stochastic, seed, c10::DeviceType::CPU);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(quant::code_dtype(fmt)));
  at::Tensor scales = at::empty({quant::num_groups(x.numel(), group_size)}, x.options().dtype(at::kFloat));
  run_job(PlainSource{F32Tiles(x)}, fmt, stochastic, seed, codes.data_ptr(), scales.data_ptr<float>(), x.numel(),
          group_size);
  return {codes, scales};
}

void quantize_into_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& data,
                       const at::Tensor& scales, c10::string_view fmt_name, int64_t group_size) {
  const Format fmt = quant::check_quantize_into_args(x, residual, data, scales,
                                                     std::string_view(fmt_name.data(), fmt_name.size()), group_size,
                                                     c10::DeviceType::CPU);
  if (residual.has_value()) {
    run_job(ResidualSource{F32Tiles(x), residual->data_ptr<float>()}, fmt, false, 0, data.data_ptr(),
            scales.data_ptr<float>(), x.numel(), group_size);
  } else {
    run_job(PlainSource{F32Tiles(x)}, fmt, false, 0, data.data_ptr(), scales.data_ptr<float>(), x.numel(), group_size);
  }
}

void requantize_mean_cpu(const at::Tensor& data, const at::Tensor& scales, const at::Tensor& out_data,
                         const at::Tensor& out_scales, const std::optional<at::Tensor>& residual, int64_t group_size) {
  const Format fmt = quant::check_requantize_mean_args(data, scales, out_data, out_scales, residual, group_size,
                                                       c10::DeviceType::CPU);
  const MeanSource src{fmt, static_cast<const char*>(data.data_ptr()), data.stride(0), scales.data_ptr<float>(),
                       scales.stride(0), data.size(0), group_size,
                       residual.has_value() ? residual->data_ptr<float>() : nullptr,
                       residual.has_value() ? residual->numel() : 0};
  run_job(src, fmt, false, 0, out_data.data_ptr(), out_scales.data_ptr<float>(), data.size(1), group_size);
}

// out := dequantize(data, scales), out of data's numel and a float dtype (checked).
void dequantize_to(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, Format fmt, at::Tensor& out) {
  const int64_t numel = data.numel();
  const F32Tiles dst(out);
  const float* scale = scales.data_ptr<float>();
  const char* codes = static_cast<const char*>(data.data_ptr());
  float* out_f32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, numel, kChunk, [&](int64_t lo, int64_t hi) {
    alignas(64) float buf[kTile];
    for (int64_t begin = lo; begin < hi;) {
      const int64_t g = begin / group_size;
      const int64_t end = std::min({hi, (g + 1) * group_size, out_f32 ? hi : begin + kTile});
      float* vals = out_f32 ? out_f32 + begin : buf;
      decode(fmt, codes + begin, end - begin, scale[g], vals);
      dst.store(begin, end - begin, vals);
      begin = end;
    }
  });
}

at::Tensor dequantize_cpu(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, at::ScalarType dtype) {
  const Format fmt = quant::check_dequantize_args(data, scales, group_size, dtype, c10::DeviceType::CPU);
  at::Tensor out = at::empty(data.sizes(), data.options().dtype(dtype));
  dequantize_to(data, scales, group_size, fmt, out);
  return out;
}

void dequantize_into_cpu(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, const at::Tensor& out) {
  const Format fmt = quant::check_dequantize_args(data, scales, group_size, out.scalar_type(), c10::DeviceType::CPU);
  quant::check_written("dequantize_into", "out", out, data.numel(), out.scalar_type(), data.device());
  at::Tensor dst = out;
  dequantize_to(data, scales, group_size, fmt, dst);
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("quantize_into", &quantize_into_cpu);
  m.impl("requantize_mean", &requantize_mean_cpu);
  m.impl("dequantize_into", &dequantize_into_cpu);
}

}  // namespace pytrain::cpu
