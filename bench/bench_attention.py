"""flash_attention against torch.nn.functional.scaled_dot_product_attention, side by side.

FLOPs (FlashAttention's convention): forward 4*B*H*L*L*D, halved for causal; forward+backward
3.5x the forward (the backward's five matmuls against the forward's two).  Rates are set against the
matmul ceiling the suite measures for the dtype (fp32 or bf16).

Targets (2-core CPU, causal, B=2, H=8, L=1024, D=64): fwd+bwd >= 1.3x SDPA's speed in fp32 and
>= 2x in bf16.  On a GPU the shape is B=4, H=16, L=4096, D=128 (a few microseconds at the CPU shape
would time launches), with the GPU targets: forward >= 0.9x SDPA's speed, backward >= 0.8x.  Memory (L = 2k, 4k, 8k; B=1, H=8, D=64): fwd+bwd peak <= 1/8 of materialised
attention's at 8k, growing linearly in L; measured as the process's peak resident memory above
its level before the call (Linux VmHWM, reset through /proc/self/clear_refs).
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness import peak_rss_above_start
from pytrain.ops import flash_attention
from pytrain.ops.attention import attention_fwd_reference, seed_tensor

SHAPES = {"cpu": (2, 8, 1024, 64), "cuda": (4, 16, 4096, 128)}  # device -> (B, H, L, D)
B, H, L, D = SHAPES["cpu"]
CEILING = {torch.float32: "fp32_matmul_TFLOPs", torch.bfloat16: "bf16_matmul_TFLOPs"}
TARGET = {"cpu": {torch.float32: ">= 1.3x SDPA's speed (ratio <= 0.77x)",
                  torch.bfloat16: ">= 2x SDPA's speed (ratio <= 0.5x)"},
          "cuda": {torch.float32: ">= 0.9x SDPA's speed (ratio <= 1.11x)",
                   torch.bfloat16: ">= 0.9x SDPA's speed fwd, 0.8x fwd+bwd"}}


def attention_flops(b, h, lq, lk, d, causal, backward):
    fwd = 4 * b * h * lq * lk * d / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def _inputs(device, dtype, b=B, h=H, length=L, d=D, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _attention(provider, impl):
    if provider == "torch":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: flash_attention(q, k, v, causal=True, impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention(provider, impl, dtype, mode, bench_device, measure):
    b, h, length, d = SHAPES[bench_device.type]
    q, k, v = _inputs(bench_device, dtype, b, h, length, d, requires_grad=mode != "fwd")
    attend = _attention(provider, impl)
    grad = torch.randn_like(q)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return attend(q, k, v)
        attend(q, k, v).backward(grad)

    measure(step, case=f"attention causal {mode} {str(dtype)[6:]} B{b} H{h} L{length} D{d}", provider=provider,
            bytes_moved=4 * q.nbytes, op="attention_fwd", impl=impl, baseline="F.scaled_dot_product_attention",
            target=TARGET[bench_device.type][dtype], flops=attention_flops(b, h, length, length, d, True, mode != "fwd"),
            ceiling=CEILING[dtype])


def _fwd_bwd(attend, q, k, v):
    def run():
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None
    return run


def _materialised(q, k, v):
    return attention_fwd_reference(q, k, v, 1 / math.sqrt(q.shape[-1]), True, -1, -1, 0.0, seed_tensor(0))[0]


def test_attention_memory(bench_device, results):
    if bench_device.type != "cpu" or not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-memory measurement reads Linux /proc (CPU runs)")
    lines = []
    for length in (2048, 4096, 8192):
        q, k, v = _inputs("cpu", torch.float32, b=1, length=length)
        ours = peak_rss_above_start(_fwd_bwd(lambda *t: flash_attention(*t, causal=True), q, k, v))
        naive = peak_rss_above_start(_fwd_bwd(_materialised, q, k, v))
        lines.append(f"attention fwd+bwd fp32 causal B1 H8 D64 L={length}: pytrain {ours / 2**20:.0f} MiB, "
                     f"materialised {naive / 2**20:.0f} MiB ({ours / naive:.3f}x; target at 8k <= 0.125x)")
    results.memory += lines

