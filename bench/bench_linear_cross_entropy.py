"""pytrain.ops.linear_cross_entropy against F.linear + F.cross_entropy (forward + backward), speed and peak memory.

    python bench/bench_linear_cross_entropy.py [--n 1024 --vocab 8000 --hidden 512] [--dtype float32] [--reps 5]

Speed: both providers in one process on the same inputs, interleaved (torch, pytrain, torch, ...), median of
``--reps`` loss + backward steps each, and the ratio.  Peak memory: the process's peak resident memory grows
monotonically, so each provider's step runs once in its own fresh child process (same inputs from the same seed)
and the growth of its peak resident memory (VmHWM) over the inputs' set-up is reported (on CUDA: torch.cuda.max_memory_allocated in
this process).  The issue's sizes (N=4096, V=32000 / 128256, H=2048) are the GPU suite's; the defaults are
scaled down for a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from pytrain.ops import linear_cross_entropy

PROVIDERS = ("torch", "pytrain")


def inputs(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device).manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, device=device) / hidden ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen, device=device)
    return h, w, t


def step(provider: str, h, w, t) -> None:
    h.grad = w.grad = None
    if provider == "torch":
        loss = F.cross_entropy(F.linear(h, w).float(), t)
    else:
        loss = linear_cross_entropy(h, w, t)
    loss.backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _vm_hwm_kib() -> int:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def child_peak(provider: str, n: int, vocab: int, hidden: int, dtype: str) -> None:
    """In a fresh process: print the MiB of peak resident memory one step adds over its inputs."""
    h, w, t = inputs(n, vocab, hidden, getattr(torch, dtype), "cpu")
    tiny = [x[:2].detach().requires_grad_() for x in (h, w)]
    step(provider, tiny[0], tiny[1], t[:2] % 2)  # first-call set-up (libraries, thread pools) before the baseline
    before = _vm_hwm_kib()
    step(provider, h, w, t)
    print((_vm_hwm_kib() - before) / 1024)


def peak_child(provider: str, args) -> float:
    code = (f"import sys; sys.path.insert(0, {__file__.rsplit('/', 1)[0]!r}); import bench_linear_cross_entropy as b; "
            f"b.child_peak({provider!r}, {args.n}, {args.vocab}, {args.hidden}, {args.dtype!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    h, w, t = inputs(args.n, args.vocab, args.hidden, getattr(torch, args.dtype), args.device)
    times = {k: [] for k in PROVIDERS}
    for provider in PROVIDERS:  # warm-up
        step(provider, h, w, t)
    for _ in range(args.reps):
        for provider in PROVIDERS:
            _sync(args.device)
            start = time.perf_counter()
            step(provider, h, w, t)
            _sync(args.device)
            times[provider].append(time.perf_counter() - start)
    if args.device == "cuda":
        peaks = {}
        for provider in PROVIDERS:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(provider, h, w, t)
            peaks[provider] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peaks = {provider: peak_child(provider, args) for provider in PROVIDERS}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {"n": args.n, "vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype,
              "torch_ms": med["torch"], "pytrain_ms": med["pytrain"], "speedup": med["torch"] / med["pytrain"],
              "torch_peak_mib": peaks["torch"], "pytrain_peak_mib": peaks["pytrain"],
              "memory_ratio": peaks["pytrain"] / max(peaks["torch"], 1e-9)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
