"""Machine ceilings the suites set every number against, measured on the machine that runs them.

Copy bandwidth (a large tensor copy, bytes read + written per second), in-place update bandwidth
and matmul FLOP/s (fp32, bf16), each the best of several runs; roofline context, as torchao's
float8 roofline and nanoGPT's ``estimate_mfu``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch

# ceiling key -> how the table's header line prints it
CEILING_FORMATS = {"copy_GBps": "copy {:.3g} GB/s", "update_GBps": "in-place update {:.3g} GB/s",
                   "fp32_matmul_TFLOPs": "fp32 matmul {:.3g} TFLOP/s", "bf16_matmul_TFLOPs": "bf16 matmul {:.3g} TFLOP/s"}


def best_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Fastest of ``reps`` runs of ``fn`` after one untimed run (CUDA: timed with events)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(device: torch.device) -> Dict[str, float]:
    """Copy GB/s (read + written) and matmul TFLOP/s on random data, best of several runs.

    Sizes are far beyond the last-level cache (256 MiB copies on the CPU, 1 GiB on CUDA) and big
    enough to fill the machine (2048^3 fp32 product on the CPU, 8192^3 on CUDA; see ``matmul_size``)."""
    cuda = device.type == "cuda"
    src = torch.randn((1 << 28) if cuda else (1 << 26), device=device)
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * src.nbytes / best_seconds(lambda: dst.copy_(src), device, 20) / 1e9,
           # read + write of the same lines (what an optimizer step does): no write-allocate reads
           "update_GBps": 2 * src.nbytes / best_seconds(lambda: src.add_(1.0), device, 20) / 1e9}
    del src, dst
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = matmul_size(device, dtype)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out[f"{name}_matmul_TFLOPs"] = 2 * n**3 / best_seconds(lambda: torch.mm(a, b), device, 5) / 1e12
    return out


def matmul_size(device: torch.device, dtype: torch.dtype) -> int:
    """n of the n^3 ceiling product: 8192 on CUDA, 2048 on the CPU.  Where a 256^3 probe shows a
    reduced-precision dtype has no fast GEMM (a 2048^3 product would take over 2 s: bf16 without AVX512_BF16 /
    AMX runs at 0.3 GFLOP/s there, a minute per product), the largest power of two whose product takes at most
    0.5 s at the probe's rate.  Such a GEMM is far from the machine's peak at any n (it reaches ~1.2 GFLOP/s at
    512^3, more than at 2048^3), and the suite need not wait minutes for its ceiling."""
    if device.type == "cuda":
        return 8192
    if dtype == torch.float32:  # every CPU build of torch has a fast fp32 GEMM
        return 2048
    a = torch.randn(256, 256, dtype=dtype)
    rate = 2 * 256**3 / best_seconds(lambda: torch.mm(a, a), device, 3)
    n = 2048
    if 2 * n**3 / rate <= 2.0:
        return n
    while n > 256 and 2 * n**3 / rate > 0.5:
        n //= 2
    return n
