// CUDA pytrain::quantize and pytrain::dequantize: 8-bit codes (int8, fp8 e4m3 / e5m2) with one float32 scale
// per group of `group_size` consecutive elements.  Same maths as csrc/cpu/quantize.cpp (contract:
// pytrain/ops/quantize.py): integer max of the magnitude bits (NaN / inf sort above every finite value),
// scale = amax / qmax and inv = qmax / amax as IEEE-rounded divisions, y = x * inv as one IEEE-rounded product
// (never fused into an FMA), int8 rint / stochastic rounding with the lowbias32 hash, fp8 by the hardware's
// round-to-nearest-even saturating cast (__nv_cvt_float_to_fp8); dequantize: one IEEE-rounded product.
//
// Subnormals: setup.py compiles with --use_fast_math, which implies -ftz=true, and under it even __fdiv_rn /
// __fmul_rn / __fsub_rn become div.rn.ftz / mul.rn.ftz / sub.rn.ftz (subnormal inputs and results flushed to
// zero): a subnormal float32 x of a live group would get code 0 where the reference gives 1 (int8, amax near
// qmax * 2^-126) or a subnormal fp8 code, and dequantize would flush subnormal products and subnormal scales.
// The arithmetic that decides codes and outputs is therefore inline PTX without .ftz (div_rn, mul_rn, add_rn,
// sub_rn below), and |d| clears the sign bit; what remains under -ftz (rint, min / max, adds and compares of
// integer-valued floats, the amax threshold test) gives the same result with or without flushing.
//
// Groups of up to kFusedMax elements: one block per group reads it, reduces the absmax and casts while the
// group is in L1/L2 (one pass over memory).  Larger groups: blocks over pieces of kPiece elements fold their
// absmax into the group's with atomicMax (a max: the result does not depend on the order), then cast.
//
// The kernels read their values from a source (below): x for quantize; x + r for quantize_into with error
// feedback (y stored into r by the absmax pass, which the cast pass reads, then r := y - dequantized); the W
// rows' dequantized mean for requantize_mean (recomputed by each pass; r += W (mean - dequantized) on the first
// m elements).  Every sum, product and difference is the non-ftz PTX below: each rounds as the reference's.
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>

#include <optional>
#include <string_view>

#include "cuda/dtype_dispatch.cuh"
#include "quantize_checks.h"

namespace pytrain::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kFusedMax = 8192;
constexpr int64_t kPiece = 8192;
using quant::kAbsMask;
using quant::kE4M3;
using quant::kE5M2;
using quant::kInfBits;
using quant::kInt8;

// IEEE round-to-nearest float32 operations that keep subnormals whatever -ftz says (see the header).
__device__ inline float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ inline float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ inline float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ inline float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

struct GroupScale {
  float scale, inv;  // inv == 0: all codes 0 (zero, tiny or non-finite group)
};

__device__ inline GroupScale group_scale(uint32_t amax_bits, float qmax) {
  if (amax_bits >= kInfBits) return {__int_as_float(0x7fc00000), 0.0f};
  const float amax = __uint_as_float(amax_bits);
  if (amax < qmax * 0x1p-126f) return {0.0f, 0.0f};
  return {div_rn(amax, qmax), div_rn(qmax, amax)};
}

template <int kFmt>
__device__ inline uint8_t encode(float x, float inv, int64_t index, uint32_t s0, uint32_t s1, bool stochastic) {
  if (inv == 0.0f) return 0;
  const float y = mul_rn(x, inv);
  if constexpr (kFmt == kInt8) {
    float r = rintf(y);
    if (stochastic) {
      const uint32_t u24 = quant::stochastic_u24(static_cast<uint64_t>(index), s0, s1);
      const float d = sub_rn(y, r);
      const float up = static_cast<float>(u24) < mul_rn(__int_as_float(__float_as_int(d) & 0x7fffffff), 0x1p24f)
                           ? 1.0f
                           : 0.0f;
      r += copysignf(up, d);
    }
    return static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(r, -127.0f), 127.0f)));
  } else {
    return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, kFmt == kE4M3 ? __NV_E4M3 : __NV_E5M2);
  }
}

__device__ inline uint32_t block_max(uint32_t v) {
  __shared__ uint32_t warp_max[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < kThreads / 32; ++w) v = max(v, warp_max[w]);
  __syncthreads();
  return v;
}

template <int kFmt>
__device__ inline float decode(uint8_t c) {
  if constexpr (kFmt == kInt8) {
    return static_cast<float>(static_cast<int8_t>(c));
  } else {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, kFmt == kE4M3 ? __NV_E4M3 : __NV_E5M2)));
  }
}

// ------------------------------------------------------------------------------- sources
// first(i): the value of element i for the absmax pass (once per element); again(i): for the cast pass (the
// same thread, after the absmax pass); feedback(i, value, dequantized) after the cast.
template <class T>
struct PlainSource {
  const T* x;
  __device__ float first(int64_t i) const { return static_cast<float>(x[i]); }
  __device__ float again(int64_t i) const { return static_cast<float>(x[i]); }
  __device__ void feedback(int64_t, float, float) const {}
};

template <class T>
struct ResidualSource {
  const T* x;
  float* r;
  __device__ float first(int64_t i) const {
    const float y = add_rn(static_cast<float>(x[i]), r[i]);
    r[i] = y;
    return y;
  }
  __device__ float again(int64_t i) const { return r[i]; }
  __device__ void feedback(int64_t i, float y, float dq) const { r[i] = sub_rn(y, dq); }
};

template <int kFmt>
struct MeanSource {
  const uint8_t* data;  // row w at data + w * row_stride
  int64_t row_stride;
  const float* scales;  // row w's group g at scales[w * scale_stride + g]
  int64_t scale_stride, rows, group;
  float* r;  // nullptr: no residual
  int64_t m;
  __device__ float first(int64_t i) const {
    const int64_t g = i / group;
    float a = mul_rn(decode<kFmt>(data[i]), scales[g]);
    for (int64_t w = 1; w < rows; ++w) {
      a = add_rn(a, mul_rn(decode<kFmt>(data[w * row_stride + i]), scales[w * scale_stride + g]));
    }
    return div_rn(a, static_cast<float>(rows));
  }
  __device__ float again(int64_t i) const { return first(i); }
  __device__ void feedback(int64_t i, float a, float dq) const {
    if (r != nullptr && i < m) r[i] = add_rn(r[i], mul_rn(static_cast<float>(rows), sub_rn(a, dq)));
  }
};

template <class Src>
__device__ inline uint32_t range_absmax(const Src& src, int64_t begin, int64_t end) {
  uint32_t m = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) m = max(m, __float_as_uint(src.first(i)) & kAbsMask);
  return block_max(m);
}

template <class Src, int kFmt>
__device__ inline void range_cast(const Src& src, uint8_t* codes, int64_t begin, int64_t end, GroupScale s, uint32_t s0,
                                  uint32_t s1, bool stochastic) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float v = src.again(i);
    const uint8_t c = encode<kFmt>(v, s.inv, i, s0, s1, stochastic);
    codes[i] = c;
    src.feedback(i, v, mul_rn(decode<kFmt>(c), s.scale));
  }
}

template <class Src, int kFmt>
__global__ void __launch_bounds__(kThreads) fused_kernel(Src src, uint8_t* codes, float* scales, int64_t numel,
                                                        int64_t group, uint32_t s0, uint32_t s1, bool stochastic) {
  const int64_t g = blockIdx.x, begin = g * group, end = min(numel, begin + group);
  const float qmax = quant::format_max(static_cast<quant::Format>(kFmt));
  const GroupScale s = group_scale(range_absmax(src, begin, end), qmax);
  if (threadIdx.x == 0) scales[g] = s.scale;
  range_cast<Src, kFmt>(src, codes, begin, end, s, s0, s1, stochastic);
}

struct Piece {
  int64_t group_index, begin, end;
};

__device__ inline Piece piece_of(int64_t p, int64_t per_group, int64_t group, int64_t numel) {
  const int64_t g = p / per_group, begin = g * group + (p % per_group) * kPiece;
  return {g, begin, min(min(numel, (g + 1) * group), begin + kPiece)};
}

template <class Src>
__global__ void __launch_bounds__(kThreads) absmax_kernel(Src src, uint32_t* group_max, int64_t numel, int64_t group,
                                                         int64_t per_group) {
  const Piece pc = piece_of(blockIdx.x, per_group, group, numel);
  const uint32_t m = range_absmax(src, pc.begin, pc.end);
  if (threadIdx.x == 0) atomicMax(group_max + pc.group_index, m);
}

// The same thread visits element i in absmax_kernel and here (same piece, same block size): a source's first()
// writes (ResidualSource's y) are this thread's own.
template <class Src, int kFmt>
__global__ void __launch_bounds__(kThreads) cast_kernel(Src src, uint8_t* codes, float* scales,
                                                       const uint32_t* group_max, int64_t numel, int64_t group,
                                                       int64_t per_group, uint32_t s0, uint32_t s1, bool stochastic) {
  const Piece pc = piece_of(blockIdx.x, per_group, group, numel);
  const float qmax = quant::format_max(static_cast<quant::Format>(kFmt));
  const GroupScale s = group_scale(group_max[pc.group_index], qmax);
  if (threadIdx.x == 0 && blockIdx.x % per_group == 0) scales[pc.group_index] = s.scale;
  range_cast<Src, kFmt>(src, codes, pc.begin, pc.end, s, s0, s1, stochastic);
}

template <class F>
void dispatch_format(int fmt, const F& f) {
  switch (fmt) {
    case kInt8: f(std::integral_constant<int, kInt8>{}); break;
    case kE4M3: f(std::integral_constant<int, kE4M3>{}); break;
    default: f(std::integral_constant<int, kE5M2>{}); break;
  }
}

// Quantizes the source's numel values into codes / scales (groups of `group`) on the current stream.
template <int kFmt, class Src>
void launch(const Src& src, void* codes, float* scales, int64_t numel, int64_t group, int64_t seed, bool stochastic,
            const at::TensorOptions& options) {
  if (numel == 0) return;
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  auto* out = static_cast<uint8_t*>(codes);
  const int64_t groups = quant::num_groups(numel, group);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (group <= kFusedMax) {
    fused_kernel<Src, kFmt><<<groups, kThreads, 0, stream>>>(src, out, scales, numel, group, s0, s1, stochastic);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t per_group = quant::num_groups(group, kPiece);
  const at::Tensor group_max = at::zeros({groups}, options.dtype(at::kInt));
  auto* gmax = reinterpret_cast<uint32_t*>(group_max.data_ptr<int32_t>());
  absmax_kernel<Src><<<groups * per_group, kThreads, 0, stream>>>(src, gmax, numel, group, per_group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cast_kernel<Src, kFmt><<<groups * per_group, kThreads, 0, stream>>>(src, out, scales, gmax, numel, group, per_group,
                                                                      s0, s1, stochastic);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, c10::string_view fmt_name, int64_t group_size,
                                                 bool stochastic, int64_t seed) {
  const quant::Format fmt = quant::check_quantize_args(x, std::string_view(fmt_name.data(), fmt_name.size()),
                                                       group_size, stochastic, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(quant::code_dtype(fmt)));
  at::Tensor scales = at::empty({quant::num_groups(x.numel(), group_size)}, x.options().dtype(at::kFloat));
  dispatch_float_dtype(x.scalar_type(), "quantize", "x", [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(fmt, [&](auto f) {
      launch<decltype(f)::value>(PlainSource<T>{static_cast<const T*>(x.data_ptr())}, codes.data_ptr(),
                                 scales.data_ptr<float>(), x.numel(), group_size, seed, stochastic, x.options());
    });
  });
  return {codes, scales};
}

void quantize_into_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& data,
                        const at::Tensor& scales, c10::string_view fmt_name, int64_t group_size) {
  const quant::Format fmt = quant::check_quantize_into_args(
      x, residual, data, scales, std::string_view(fmt_name.data(), fmt_name.size()), group_size, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float_dtype(x.scalar_type(), "quantize_into", "x", [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data_ptr());
    dispatch_format(fmt, [&](auto f) {
      constexpr int kFmt = decltype(f)::value;
      if (residual.has_value()) {
        launch<kFmt>(ResidualSource<T>{in, residual->data_ptr<float>()}, data.data_ptr(), scales.data_ptr<float>(),
                     x.numel(), group_size, 0, false, x.options());
      } else {
        launch<kFmt>(PlainSource<T>{in}, data.data_ptr(), scales.data_ptr<float>(), x.numel(), group_size, 0, false,
                     x.options());
      }
    });
  });
}

void requantize_mean_cuda(const at::Tensor& data, const at::Tensor& scales, const at::Tensor& out_data,
                          const at::Tensor& out_scales, const std::optional<at::Tensor>& residual, int64_t group_size) {
  const quant::Format fmt = quant::check_requantize_mean_args(data, scales, out_data, out_scales, residual, group_size,
                                                              c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(data.device());
  dispatch_format(fmt, [&](auto f) {
    constexpr int kFmt = decltype(f)::value;
    const MeanSource<kFmt> src{static_cast<const uint8_t*>(data.data_ptr()), data.stride(0), scales.data_ptr<float>(),
                               scales.stride(0), data.size(0), group_size,
                               residual.has_value() ? residual->data_ptr<float>() : nullptr,
                               residual.has_value() ? residual->numel() : 0};
    launch<kFmt>(src, out_data.data_ptr(), out_scales.data_ptr<float>(), data.size(1), group_size, 0, false,
                 data.options());
  });
}

template <class T, int kFmt>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const uint8_t* codes, const float* scales, T* out,
                                                             int64_t numel, int64_t group) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    out[i] = static_cast<T>(mul_rn(decode<kFmt>(codes[i]), scales[i / group]));
  }
}

// out (data's numel, a float dtype; checked) := dequantize(data, scales).
void dequantize_to(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, quant::Format fmt,
                   const at::Tensor& out) {
  const int64_t numel = data.numel();
  if (numel == 0) return;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{1} << 20);
  dispatch_float_dtype(out.scalar_type(), "dequantize", "outputs", [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(fmt, [&](auto f) {
      dequantize_kernel<T, decltype(f)::value><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const uint8_t*>(data.data_ptr()), scales.data_ptr<float>(), static_cast<T*>(out.data_ptr()),
          numel, group_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor dequantize_cuda(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, at::ScalarType dtype) {
  const quant::Format fmt = quant::check_dequantize_args(data, scales, group_size, dtype, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty(data.sizes(), data.options().dtype(dtype));
  dequantize_to(data, scales, group_size, fmt, out);
  return out;
}

void dequantize_into_cuda(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, const at::Tensor& out) {
  const quant::Format fmt =
      quant::check_dequantize_args(data, scales, group_size, out.scalar_type(), c10::DeviceType::CUDA);
  quant::check_written("dequantize_into", "out", out, data.numel(), out.scalar_type(), data.device());
  const c10::cuda::CUDAGuard guard(data.device());
  dequantize_to(data, scales, group_size, fmt, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("quantize_into", &quantize_into_cuda);
  m.impl("requantize_mean", &requantize_mean_cuda);
  m.impl("dequantize_into", &dequantize_into_cuda);
}

}  // namespace pytrain::cuda
