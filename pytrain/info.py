"""``pytrain.info()``: what this process can run, and why not."""
from __future__ import annotations

import platform
from typing import Any, Dict

import torch

from . import _extension
from .ops import REGISTRIES


def _cpu_capabilities() -> Dict[str, bool]:
    ext, _ = _extension.load_extension()
    if ext is not None:
        return dict(ext.cpu_capabilities())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {name: name in flags for name in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16")}


def _cpu_attention_paths() -> Dict[str, str]:
    """The GEMM path of the CPU attention kernels per input dtype (amx, avx512_bf16, fp32; csrc/cpu/attention_isa.h)."""
    ext, why = _extension.load_extension()
    if ext is None:
        return {"all": f"unavailable: {why}"}
    try:
        return dict(ext.cpu_attention_paths())
    except RuntimeError as err:  # a PYTRAIN_CPU_ATTENTION_PATH this CPU cannot run
        return {"all": f"unavailable: {err}"}


def _cpu_simd_clone() -> str:
    """The clone of the SIMD CPU kernels (GCC target_clones: x86-64-v4, x86-64-v3 or default) this CPU runs."""
    ext, why = _extension.load_extension()
    return ext.cpu_simd_clone() if ext is not None else f"unavailable: {why}"


def _cpu_fp32_lanes() -> str:
    """The fp32 vector width of the CPU attention kernels (16 lanes with AVX-512, else 8; csrc/cpu/attention_isa.h)."""
    ext, why = _extension.load_extension()
    if ext is None:
        return f"unavailable: {why}"
    try:
        lanes = ext.cpu_fp32_lanes()
    except RuntimeError as err:  # a bad PYTRAIN_CPU_FP32_LANES
        return f"unavailable: {err}"
    return f"{lanes} lanes ({'zmm' if lanes == 16 else 'ymm'})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def _triton_version() -> str:
    why = _extension.triton_import_error()
    if why:
        return f"unavailable: {why}"
    import triton

    return triton.__version__


def info() -> Dict[str, Any]:
    """Versions, extension status, CPU SIMD features, GPU, and per-op backend availability.

    ``ops[op][impl]`` is "available" or the reason that backend cannot run here.
    """
    from . import __version__

    ext, ext_reason = _extension.load_extension()
    return {
        "pytrain": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "extension": "loaded" + (" (with CUDA kernels)" if ext.built_with_cuda() else " (CPU only)")
        if ext is not None else ext_reason,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capabilities": _cpu_capabilities(),
        "cpu_attention_paths": _cpu_attention_paths(),
        "cpu_simd_clone": _cpu_simd_clone(),
        "cpu_fp32_vectors": _cpu_fp32_lanes(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": _extension.triton_interpreted(),
        "ops": {name: {impl: why or "available" for impl, why in reg.availability().items()}
                for name, reg in sorted(REGISTRIES.items())},
    }


def format_info(data: Dict[str, Any]) -> str:
    """``info()`` as readable text (what ``pytrain info`` prints)."""
    lines = [f"{key:18} {value}" for key, value in data.items() if key not in ("ops", "cpu_capabilities", "cpu_attention_paths")]
    caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in data["cpu_capabilities"].items())
    lines.append(f"{'cpu_capabilities':18} {caps}")
    paths = ", ".join(f"{k}={v}" for k, v in data["cpu_attention_paths"].items())
    lines.append(f"{'cpu_attention_path':18} {paths}")
    lines.append("backends per op:")
    width = max(map(len, data["ops"]), default=0)
    for op, impls in data["ops"].items():
        for impl, status in impls.items():
            lines.append(f"  {op:{width}} {impl:10} {status}")
    return "\n".join(lines)
