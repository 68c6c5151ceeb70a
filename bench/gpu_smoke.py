"""Run every CUDA C++ and Triton op once on small CUDA tensors: a short workload for compute-sanitizer.

    python bench/gpu_smoke.py                                  # every op, both GPU backends
    compute-sanitizer --tool memcheck python bench/gpu_smoke.py
    python bench/gpu_smoke.py --impl triton --only quantize    # a subset

Odd sizes everywhere (partial blocks, programs and groups), so out-of-bounds accesses at tensor ends show up.
Each call is followed by a device synchronize, so an asynchronous error is charged to the op that caused it.
Exit status: 0 when every op ran, 1 when any op raised or its backend was unavailable, 2 when no CUDA device is
present (one line says so).  This checks that the kernels run, not their results: tests/gpu does that.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from typing import Callable, Dict, List, Tuple

import torch

DEVICE = "cuda"
SHAPES = [(1,), (5, 123, 7), (257,), (3, 300), (1000,)]


def _randn(shapes, dtype=torch.float32, scale=1.0, seed=0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen)).to(dtype).to(DEVICE) for s in shapes]


def _zeros(shapes, dtype) -> List[torch.Tensor]:
    return [torch.zeros(s, dtype=dtype, device=DEVICE) for s in shapes]


def adamw(impl: str) -> None:
    import pytrain.ops as ops
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for step, (param, state, amsgrad, masters, maximize) in enumerate([
            (torch.float32, torch.float32, True, False, False), (torch.bfloat16, torch.bfloat16, False, True, True),
            (torch.float16, "int8", False, True, False)], start=1):
        master = _randn(SHAPES, seed=step) if masters else []
        params = [m.to(param) for m in master] if masters else _randn(SHAPES, param, seed=step)
        grads = _randn(SHAPES, param, 0.1, seed=10 + step)
        if state == "int8":
            blocks = [(math.prod(s) + 255) // 256 for s in SHAPES]
            m, v = _zeros(SHAPES, torch.int8), _zeros(SHAPES, torch.uint8)
            ms, vs = _zeros(blocks, torch.float32), _zeros(blocks, torch.float32)
        else:
            m, v, ms, vs = _zeros(SHAPES, state), _zeros(SHAPES, state), [], []
        vmax = _zeros(SHAPES, state) if amsgrad else []
        ops.adamw_step(params, grads, m, v, vmax, master, ms, vs, **hyper, step=step, amsgrad=amsgrad,
                       maximize=maximize, grad_scale=0.5, impl=impl)


def lars(impl: str) -> None:
    import pytrain.ops as ops
    for dtype, momentum in ((torch.float32, 0.9), (torch.bfloat16, 0.0)):
        params, grads = _randn(SHAPES, dtype), _randn(SHAPES, dtype, 0.1, seed=1)
        ops.lars_step(params, grads, _zeros(SHAPES, dtype) if momentum else [], lr=0.1, momentum=momentum,
                      dampening=0.0, weight_decay=0.01, trust_coefficient=0.02, eps=1e-8, nesterov=momentum > 0,
                      trust_clip=True, adapt=True, init_buffers=True, impl=impl)


def lamb(impl: str) -> None:
    import pytrain.ops as ops
    for dtype in (torch.float32, torch.float16):
        params, grads = _randn(SHAPES, dtype), _randn(SHAPES, dtype, 0.1, seed=1)
        ops.lamb_step(params, grads, _zeros(SHAPES, dtype), _zeros(SHAPES, dtype), lr=1e-2, beta1=0.9, beta2=0.999,
                      beta3=0.1, eps=1e-6, weight_decay=0.01, bias_correction1=0.1, bias_correction2=0.001,
                      grad_scale=0.5, adapt=True, trust_clip=True, impl=impl)


def global_norm(impl: str) -> None:
    import pytrain.ops as ops
    for dtype in (torch.float32, torch.bfloat16):
        ops.global_norm(_randn(SHAPES, dtype), impl=impl)


def quantize(impl: str) -> None:
    from pytrain.ops.quantize import dequantize_groups, quantize_groups
    x = torch.randn(3, 7001, device=DEVICE)
    for fmt, group, stochastic, seed in (("int8", 256, False, 0), ("int8", 7, True, 2**32 + 1),
                                         ("fp8_e4m3", 9000, False, 0), ("fp8_e5m2", x.numel(), False, 0)):
        for dtype in (torch.float32, torch.bfloat16):
            data, scales = quantize_groups(x.to(dtype), fmt, group, stochastic=stochastic, seed=seed, impl=impl)
            dequantize_groups(data, scales, group, dtype, impl=impl)


def topk(impl: str) -> None:
    from pytrain.comm import topk as comm_topk
    from pytrain.ops.topk import topk_filter
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 70001, device=DEVICE).to(dtype)
        topk_filter(x, 1.5, impl=impl)
        comm_topk(x, 0.01, impl=impl)
        comm_topk(x, 0.01, exact=True, impl=impl)


def powersgd(impl: str) -> None:
    from pytrain.comm import orthogonalize_, powersgd_compress, powersgd_p, powersgd_q
    for shape, r in (((37, 29), 4), ((3, 130, 67), 5), ((1, 1), 1)):
        M = torch.randn(shape, device=DEVICE)
        Q = torch.randn(shape[:-2] + (shape[-1], r), device=DEVICE)
        P = powersgd_p(M, Q, impl=impl)
        powersgd_q(M, P, impl=impl)
        orthogonalize_(P, impl=impl)
        powersgd_compress(M, Q, impl=impl)


def attention(impl: str) -> None:
    from pytrain.ops import flash_attention
    for dtype, (h, hkv, lq, lk, d), kwargs in (
            (torch.float16, (4, 2, 67, 67, 64), dict(causal=True, dropout_p=0.1, seed=1)),
            (torch.bfloat16, (2, 1, 33, 70, 80), dict(window=(16, 8))),
            (torch.float32, (2, 2, 100, 50, 72), dict(causal=True))):
        q = torch.randn(1, h, lq, d, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
        flash_attention(q, k, v, impl=impl, **kwargs).sum().backward()


def _linear_inputs(dtype, n: int, hidden: int, vocab: int):
    """hidden (n, hidden) and weight (vocab, hidden) needing grads, targets with one ignored token."""
    h = torch.randn(n, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=DEVICE) / hidden ** 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), device=DEVICE)
    target[n // 2] = -100
    return h, w, target


#: (dtype, tokens, hidden, vocab, chunk_size) of the fused linear losses: chunks that do not divide N, a vocabulary
#: under one block's threads and odd ones over it
LINEAR_CASES = [(torch.float32, 37, 16, 1003, 8), (torch.bfloat16, 5, 24, 3, None), (torch.float16, 70, 40, 257, 64)]


def linear_cross_entropy(impl: str) -> None:
    from pytrain.ops import linear_cross_entropy as loss_fn
    for dtype, n, hidden, vocab, chunk in LINEAR_CASES:
        h, w, target = _linear_inputs(dtype, n, hidden, vocab)
        bias = torch.randn(vocab, device=DEVICE, dtype=dtype, requires_grad=True)
        loss_fn(h, w, target, bias, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, chunk_size=chunk,
                impl=impl).backward()
        loss_fn(h, w, target, reduction="none", chunk_size=chunk, impl=impl).sum().backward()


def linear_distillation_loss(impl: str) -> None:
    from pytrain.ops import linear_distillation_loss as loss_fn
    for dtype, n, hidden, vocab, chunk in LINEAR_CASES:
        h, w, target = _linear_inputs(dtype, n, hidden, vocab)
        teacher_h, teacher_w, _ = _linear_inputs(dtype, n, 2 * hidden + 1, vocab)
        for kind in ("kl", "reverse_kl", "jsd"):
            loss_fn(h, w, teacher_h, teacher_w, target, kind=kind, temperature=2.0, hard_label_weight=0.3,
                    chunk_size=chunk, impl=impl).backward()
        loss_fn(h, w, teacher_h, teacher_w, None, kind="jsd", beta=0.3, reduction="none", chunk_size=chunk,
                impl=impl).sum().backward()


#: (name, function, registry op names it needs, backends it has)
OPS: List[Tuple[str, Callable[[str], None], Tuple[str, ...], Tuple[str, ...]]] = [
    ("adamw", adamw, ("adamw_step",), ("cuda", "triton")),
    ("lars", lars, ("lars_step",), ("cuda", "triton")),
    ("lamb", lamb, ("lamb_step",), ("cuda", "triton")),
    ("global_norm", global_norm, ("global_norm",), ("cuda", "triton")),
    ("quantize", quantize, ("quantize", "dequantize"), ("cuda", "triton")),
    ("topk", topk, ("topk_filter",), ("cuda", "triton")),
    ("powersgd", powersgd, ("powersgd_p", "powersgd_q", "orthogonalize"), ("cuda", "triton")),
    ("attention", attention, ("attention_fwd", "attention_bwd"), ("triton",)),  # no CUDA C++ attention
    ("linear_cross_entropy", linear_cross_entropy, ("linear_cross_entropy",), ("cuda", "triton")),
    ("linear_distillation_loss", linear_distillation_loss, ("linear_distillation_loss",), ("cuda", "triton")),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["cuda", "triton"], action="append", help="backend(s) to run (default both)")
    parser.add_argument("--only", action="append", choices=[name for name, *_ in OPS], help="op(s) to run (default all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run (exit 2)")
        return 2
    from pytrain._extension import triton_interpreted
    from pytrain.ops import registry
    if triton_interpreted():
        print("TRITON_INTERPRET=1 is set: unset it, the smoke run is for compiled Triton")
        return 2
    impls = args.impl or ["cuda", "triton"]
    failures: Dict[str, str] = {}
    for name, fn, op_names, backends in OPS:
        if args.only and name not in args.only:
            continue
        for impl in impls:
            if impl not in backends:
                continue
            label = f"{name}/{impl}"
            why = next((w for w in (registry(op).availability().get(impl) for op in op_names) if w), None)
            if why:
                failures[label] = f"unavailable: {why}"
                print(f"FAIL  {label}: unavailable: {why}", flush=True)
                continue
            start = time.perf_counter()
            try:
                fn(impl)
                torch.cuda.synchronize()
            except Exception as exc:  # report every op, then fail
                failures[label] = f"{type(exc).__name__}: {exc}"
                print(f"FAIL  {label}: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                continue
            print(f"ok    {label} ({time.perf_counter() - start:.1f}s)", flush=True)
    if failures:
        print(f"{len(failures)} failed: {', '.join(failures)}")
        return 1
    print("every op ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
