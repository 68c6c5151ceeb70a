// The Python module pytrain._C.  Importing it runs the TORCH_LIBRARY_IMPL blocks of every
// csrc/cpu/*.cpp and csrc/cuda/*.cu file, which register the CPU and CUDA kernels of the
// ops whose schemas pytrain/ops declares.  pybind11 serves only the helpers that are not ops.
#include <torch/extension.h>

#include <string>

#include "cpu/attention_isa.h"

namespace {

// What the CPU this process runs on can do (the kernels pick their SIMD path at run time).
py::dict cpu_capabilities() {
  __builtin_cpu_init();
  py::dict caps;
  caps["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  caps["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  caps["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  caps["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  caps["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  caps["amx_bf16"] = pytrain::cpu::cpu_has_amx_bf16();  // as oneDNN sees it (the brgemm paths use it)
  return caps;
}

// The GEMM path the CPU attention kernels take for each input dtype (head dim 64), this CPU, this environment.
py::dict cpu_attention_paths() {
  py::dict paths;
  for (auto [name, dtype] : {std::pair{"float32", at::kFloat}, std::pair{"bfloat16", at::kBFloat16},
                             std::pair{"float16", at::kHalf}}) {
    paths[name] = pytrain::cpu::attention_path_name(pytrain::cpu::attention_path("attention", dtype, 64));
  }
  return paths;
}

// The clone of the PYTRAIN_SIMD kernels (optimizers, quantization, norms, the attention's element-wise code:
// GCC target_clones, see cpu/multi_tensor.h) that the loader picks on this CPU.
std::string cpu_simd_clone() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2 + FMA)";
  return "default (x86-64)";
#else
  return "default";
#endif
}

int cpu_fp32_lanes() { return pytrain::cpu::fp32_lanes("attention"); }

bool built_with_cuda() {
#ifdef PYTRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pytrain compiled kernels (ops register through torch.library; these are helpers)";
  m.def("cpu_capabilities", &cpu_capabilities, "SIMD features of this CPU: avx2, fma, avx512f, avx512bw, avx512bf16, amx_bf16");
  m.def("cpu_attention_paths", &cpu_attention_paths,
        "GEMM path of the CPU attention kernels per dtype: amx, avx512_bf16 or fp32 (csrc/cpu/attention_isa.h)");
  m.def("cpu_simd_clone", &cpu_simd_clone,
        "which target_clones clone of the PYTRAIN_SIMD CPU kernels runs here: x86-64-v4, x86-64-v3 or default");
  m.def("cpu_fp32_lanes", &cpu_fp32_lanes,
        "fp32 vector width of the CPU attention kernels: 16 (AVX-512) or 8 lanes (csrc/cpu/attention_isa.h)");
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled into this extension");
}
