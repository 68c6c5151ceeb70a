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
// The arithmetic that decides codes and outputs is therefore inline PTX without .ftz (div_rn, mul_rn, sub_rn
// below), and |d| clears the sign bit; what remains under -ftz (rint, min / max, adds and compares of
// integer-valued floats, the amax threshold test) gives the same result with or without flushing.
//
// Groups of up to kFusedMax elements: one block per group reads it, reduces the absmax and casts while the
// group is in L1/L2 (one pass over memory).  Larger groups: blocks over pieces of kPiece elements fold their
// absmax into the group's with atomicMax (a max: the result does not depend on the order), then cast.
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp8.h>

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

template <class T>
__device__ inline uint32_t range_absmax(const T* x, int64_t begin, int64_t end) {
  uint32_t m = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    m = max(m, __float_as_uint(static_cast<float>(x[i])) & kAbsMask);
  }
  return block_max(m);
}

template <class T, int kFmt>
__device__ inline void range_cast(const T* x, uint8_t* codes, int64_t begin, int64_t end, float inv, uint32_t s0,
                                  uint32_t s1, bool stochastic) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    codes[i] = encode<kFmt>(static_cast<float>(x[i]), inv, i, s0, s1, stochastic);
  }
}

template <class T, int kFmt>
__global__ void __launch_bounds__(kThreads) fused_kernel(const T* x, uint8_t* codes, float* scales, int64_t numel,
                                                        int64_t group, uint32_t s0, uint32_t s1, bool stochastic) {
  const int64_t g = blockIdx.x, begin = g * group, end = min(numel, begin + group);
  const float qmax = quant::format_max(static_cast<quant::Format>(kFmt));
  const GroupScale s = group_scale(range_absmax(x, begin, end), qmax);
  if (threadIdx.x == 0) scales[g] = s.scale;
  range_cast<T, kFmt>(x, codes, begin, end, s.inv, s0, s1, stochastic);
}

struct Piece {
  int64_t group_index, begin, end;
};

__device__ inline Piece piece_of(int64_t p, int64_t per_group, int64_t group, int64_t numel) {
  const int64_t g = p / per_group, begin = g * group + (p % per_group) * kPiece;
  return {g, begin, min(min(numel, (g + 1) * group), begin + kPiece)};
}

template <class T>
__global__ void __launch_bounds__(kThreads) absmax_kernel(const T* x, uint32_t* group_max, int64_t numel,
                                                         int64_t group, int64_t per_group) {
  const Piece pc = piece_of(blockIdx.x, per_group, group, numel);
  const uint32_t m = range_absmax(x, pc.begin, pc.end);
  if (threadIdx.x == 0) atomicMax(group_max + pc.group_index, m);
}

template <class T, int kFmt>
__global__ void __launch_bounds__(kThreads) cast_kernel(const T* x, uint8_t* codes, float* scales,
                                                       const uint32_t* group_max, int64_t numel, int64_t group,
                                                       int64_t per_group, uint32_t s0, uint32_t s1, bool stochastic) {
  const Piece pc = piece_of(blockIdx.x, per_group, group, numel);
  const float qmax = quant::format_max(static_cast<quant::Format>(kFmt));
  const GroupScale s = group_scale(group_max[pc.group_index], qmax);
  if (threadIdx.x == 0 && blockIdx.x % per_group == 0) scales[pc.group_index] = s.scale;
  range_cast<T, kFmt>(x, codes, pc.begin, pc.end, s.inv, s0, s1, stochastic);
}

template <class F>
void dispatch_format(int fmt, const F& f) {
  switch (fmt) {
    case kInt8: f(std::integral_constant<int, kInt8>{}); break;
    case kE4M3: f(std::integral_constant<int, kE4M3>{}); break;
    default: f(std::integral_constant<int, kE5M2>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, c10::string_view fmt_name, int64_t group_size,
                                                 bool stochastic, int64_t seed) {
  const quant::Format fmt = quant::check_quantize_args(x, std::string_view(fmt_name.data(), fmt_name.size()),
                                                       group_size, stochastic, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel(), groups = quant::num_groups(numel, group_size);
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(quant::code_dtype(fmt)));
  at::Tensor scales = at::empty({groups}, x.options().dtype(at::kFloat));
  if (numel == 0) return {codes, scales};
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  auto* out = static_cast<uint8_t*>(codes.data_ptr());
  float* scale = scales.data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(x.scalar_type(), "quantize", "x", [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data_ptr());
    dispatch_format(fmt, [&](auto f) {
      constexpr int kFmt = decltype(f)::value;
      if (group_size <= kFusedMax) {
        fused_kernel<T, kFmt><<<groups, kThreads, 0, stream>>>(in, out, scale, numel, group_size, s0, s1, stochastic);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const int64_t per_group = quant::num_groups(group_size, kPiece);
      const at::Tensor group_max = at::zeros({groups}, x.options().dtype(at::kInt));
      auto* gmax = reinterpret_cast<uint32_t*>(group_max.data_ptr<int32_t>());
      absmax_kernel<T><<<groups * per_group, kThreads, 0, stream>>>(in, gmax, numel, group_size, per_group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cast_kernel<T, kFmt><<<groups * per_group, kThreads, 0, stream>>>(in, out, scale, gmax, numel, group_size,
                                                                        per_group, s0, s1, stochastic);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {codes, scales};
}

template <int kFmt>
__device__ inline float decode(uint8_t c) {
  if constexpr (kFmt == kInt8) {
    return static_cast<float>(static_cast<int8_t>(c));
  } else {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, kFmt == kE4M3 ? __NV_E4M3 : __NV_E5M2)));
  }
}

template <class T, int kFmt>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const uint8_t* codes, const float* scales, T* out,
                                                             int64_t numel, int64_t group) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    out[i] = static_cast<T>(mul_rn(decode<kFmt>(codes[i]), scales[i / group]));
  }
}

at::Tensor dequantize_cuda(const at::Tensor& data, const at::Tensor& scales, int64_t group_size, at::ScalarType dtype) {
  const quant::Format fmt = quant::check_dequantize_args(data, scales, group_size, dtype, c10::DeviceType::CUDA);
  const int64_t numel = data.numel();
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty(data.sizes(), data.options().dtype(dtype));
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{1} << 20);
  dispatch_float_dtype(dtype, "dequantize", "outputs", [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(fmt, [&](auto f) {
      dequantize_kernel<T, decltype(f)::value><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const uint8_t*>(data.data_ptr()), scales.data_ptr<float>(), static_cast<T*>(out.data_ptr()),
          numel, group_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace pytrain::cuda
