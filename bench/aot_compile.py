#!/usr/bin/env python
"""Compile every Triton kernel of kernels/*.py ahead of time for sm_90 (H100 / H200), with no GPU.

    python bench/aot_compile.py [--out FILE] [--quick | --smoke] [--only SUBSTRING]

The variants are the launches the launchers themselves make: each *driver* below calls a launcher
(``pytrain.kernels.<op>``) with CPU tensors of the dtypes and flags of one case, while
``JITFunction.run`` is replaced by a recorder.  The launcher decides every constexpr, config and
launch option as it does on a GPU (nothing about them is repeated here); the recorder then asks
Triton's own JIT binder, built for the sm_90 target, for the signature, constexprs and attributes the
JIT would compile, and compiles exactly that with ``triton.compile(ASTSource(...), target=sm_90)``.
Integer arguments are specialised as the JIT does (a value of 1 becomes a constant, multiples of 16 get
a divisibility hint), so the shapes the drivers use are typical training shapes.

A compile error of any variant fails the run (exit 1) and names the variant; the report (markdown:
registers, spills, stack frame, shared memory per variant, from the ptxas log of the compile and the
compiled kernel's metadata) is written either way, to bench/results/aot-sm90.md by default.

Modes: full (default: every dtype, format and flag combination the launchers can launch),
``--quick`` (a representative subset, for CI), ``--smoke`` (one variant of every kernel: tests/test_aot.py).
Only the two small functions under "Triton API" use Triton internals; they work unchanged with Triton 3.6
(the GPU machine's, with torch 2.11: requirements-device.txt) and 3.8 (requirements-test.txt).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

# The kernels must be JITFunctions (compilable), not the interpreter's wrappers; the launchers must use
# their GPU configs (not the interpreter's) and the fixed attention tiles (no autotuner).
os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("PYTRAIN_ATTENTION_AUTOTUNE", None)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
DEFAULT_OUT = ROOT / "bench" / "results" / "aot-sm90.md"
GENERIC_SEED = 0x123456789ABCDEF0  # low word >= 2^31 (an int64 argument), high word an int32


# ------------------------------------------------------------------------------------------ Triton API
def jit_specialization(fn: JITFunction, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) that ``fn[grid](*args, **kwargs)`` would compile for TARGET:
    the JIT's own binder (JITFunction.run, Triton 3.6 and 3.8) with the backend of TARGET instead of the current GPU's."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_for_target(fn: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict):
    """(compiled kernel, ptxas -v log) of one variant for TARGET; raises on a compile error."""
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True   # ptxas -v output (registers, spills) is printed, not kept
        knobs.compilation.always_compile = True  # a cache hit would run no ptxas: no log
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=TARGET, options=options)
    return kernel, log.getvalue()


# ------------------------------------------------------------------------------------------- recording
@dataclass
class Launch:
    """One recorded kernel launch and the case (driver label) that made it."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    case: str


@contextlib.contextmanager
def recording(launches: List[Launch], case: str):
    """Within the block, Triton launches are recorded in ``launches`` instead of run.  Tensor arguments
    are filled with ones, as if the kernel had written its outputs, so that host code which reads a
    kernel's output (topk's output size) takes its launching path."""
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                a.fill_(1)
        launches.append(Launch(self, args, kwargs, case))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


# --------------------------------------------------------------------------------------------- drivers
# A driver is (case label, function calling launchers); MODES says which drivers each mode runs.
Driver = Tuple[str, Callable[[], None]]
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (4096 * 3, 1000, 300)  # per tensor of the optimizer lists: full blocks and masked tails


def _tensors(dtype: torch.dtype, aligned: bool = True) -> List[torch.Tensor]:
    if aligned:
        return [torch.empty(n, dtype=dtype) for n in SIZES]
    return [torch.empty(n + 1, dtype=dtype)[1:] for n in SIZES]  # contiguous, address not a multiple of 16


def adamw(param: str, state: str, master: bool = False, amsgrad: bool = False, maximize: bool = False,
          aligned: bool = True) -> Driver:
    def run():
        from pytrain.kernels.adamw import adamw_step
        from pytrain.ops.adamw import INT8_BLOCK

        p = _tensors(FLOATS[param], aligned)
        quant = state == "int8"
        sd = torch.float32 if quant else FLOATS[state]
        m = _tensors(torch.int8) if quant else _tensors(sd)
        v = _tensors(torch.uint8) if quant else _tensors(sd)
        scales = [torch.empty(triton.cdiv(n, INT8_BLOCK)) for n in SIZES] if quant else []
        adamw_step(p, _tensors(FLOATS[param], aligned), m, v, _tensors(sd) if amsgrad else [],
                   _tensors(torch.float32) if master else [], scales, list(scales), 1e-3, 0.9, 0.999, 1e-8, 0.01,
                   [7.0] * len(SIZES), amsgrad, maximize, 1.0, int8_block=INT8_BLOCK)

    flags = "".join(f" {n}" for n, on in (("master", master), ("amsgrad", amsgrad), ("maximize", maximize),
                                          ("unaligned", not aligned)) if on)
    return f"adamw param={param} state={state}{flags}", run


def lars(dtype: str, adapt: bool, momentum: bool, nesterov: bool = False, trust_clip: bool = False,
         init: bool = False) -> Driver:
    def run():
        from pytrain.kernels.lars import lars_step

        lars_step(_tensors(FLOATS[dtype]), _tensors(FLOATS[dtype]), _tensors(FLOATS[dtype]) if momentum else [], 0.1,
                  0.9 if momentum else 0.0, 0.0, 1e-4, 1e-3, 1e-8, nesterov, trust_clip, adapt, init)

    flags = "".join(f" {n}" for n, on in (("adapt", adapt), ("momentum", momentum), ("nesterov", nesterov),
                                          ("trust_clip", trust_clip), ("init_buffers", init)) if on)
    return f"lars {dtype}{flags}", run


def lamb(dtype: str, adapt: bool, trust_clip: bool = False) -> Driver:
    def run():
        from pytrain.kernels.lamb import lamb_step

        t = [_tensors(FLOATS[dtype]) for _ in range(4)]
        lamb_step(*t, 1e-3, 0.9, 0.999, 0.1, 1e-6, 0.01, 0.5, 0.25, 1.0, adapt, trust_clip)

    return f"lamb {dtype}{' adapt' if adapt else ''}{' trust_clip' if trust_clip else ''}", run


def global_norm(dtype: str) -> Driver:
    def run():
        from pytrain.kernels.global_norm import global_norm as launch

        launch(_tensors(FLOATS[dtype]))

    return f"global_norm {dtype}", run


def quantize(dtype: str, fmt: str, group: int, stochastic: bool = False, seed: int = GENERIC_SEED) -> Driver:
    def run():
        from pytrain.kernels.quantize import quantize as launch
        from pytrain.ops.quantize import FORMATS

        launch(torch.empty(group * 3 + 5, dtype=FLOATS[dtype]), FORMATS[fmt], group, stochastic, seed)

    rounding = f" stochastic seed={seed:#x}" if stochastic else ""
    return f"quantize {dtype} {fmt} group={group}{rounding}", run


def dequantize(fmt: str, dtype: str) -> Driver:
    def run():
        from pytrain.kernels.quantize import dequantize as launch
        from pytrain.ops.quantize import FORMATS

        spec = FORMATS[fmt]
        launch(torch.empty(40000, dtype=spec.dtype), spec, torch.empty(313), 128, FLOATS[dtype])

    return f"dequantize {fmt} -> {dtype}", run


def quantize_into(dtype: str, fmt: str, group: int) -> Driver:
    """quantize of x + r with error feedback (the quantized all-reduce's first pass)."""
    def run():
        from pytrain.kernels.quantize import quantize_into as launch
        from pytrain.ops.quantize import FORMATS

        spec, n = FORMATS[fmt], group * 3 + 5
        launch(torch.empty(n, dtype=FLOATS[dtype]), torch.empty(n), torch.empty(n, dtype=spec.dtype),
               torch.empty(-(-n // group)), spec, group, False, 0)

    return f"quantize_into {dtype} {fmt} group={group} residual", run


def requantize_mean(fmt: str, group: int, feedback: bool = True) -> Driver:
    """The mean of 2 rows of codes requantized (the quantized all-reduce's reduce step)."""
    def run():
        from pytrain.kernels.quantize import requantize_mean as launch
        from pytrain.ops.quantize import FORMATS

        spec, n = FORMATS[fmt], group * 3 + 5
        groups = -(-n // group)
        launch(torch.empty(2, n, dtype=spec.dtype), torch.empty(2, groups), torch.empty(n, dtype=spec.dtype),
               torch.empty(groups), torch.empty(n - 7) if feedback else None, spec, group)

    return f"requantize_mean {fmt} group={group}{' residual' if feedback else ''}", run


def topk(dtype: str) -> Driver:
    def run():
        from pytrain.kernels.topk import topk_filter

        topk_filter(torch.empty(3 * 4096 + 17, dtype=FLOATS[dtype]), 0.5)

    return f"topk {dtype}", run


def powersgd(rank: int) -> Driver:
    def run():
        from pytrain.kernels.powersgd import orthogonalize, powersgd_p, powersgd_q

        m = torch.empty(2, 1000, 768)
        powersgd_p(m, torch.empty(2, 768, rank))
        powersgd_q(m, torch.empty(2, 1000, rank))
        orthogonalize(torch.empty(2, 1000, rank), 1e-8)

    return f"powersgd rank={rank}", run


def linear_cross_entropy(dtype: str, bias: bool, softcap: bool, grad: bool, vocab: int = 5003) -> Driver:
    def run():
        from pytrain.kernels.linear_cross_entropy import linear_cross_entropy as launch

        n, h = 8, 64
        w = torch.empty(vocab, h, dtype=FLOATS[dtype])
        launch(torch.empty(n, h, dtype=FLOATS[dtype]), w, torch.zeros(n, dtype=torch.int64),
               torch.empty(vocab, dtype=FLOATS[dtype]) if bias else None, torch.ones(n) if grad else None,
               -100, 0.1, 1e-4, 30.0 if softcap else 0.0, 4)

    flags = "".join(f" {name}" for name, on in (("bias", bias), ("softcap", softcap), ("grad", grad)) if on)
    return f"linear_cross_entropy {dtype} V={vocab}{flags}", run


def linear_distillation_loss(dtype: str, kind: str, target: bool, hard: bool, grad: bool,
                             vocab: int = 5003) -> Driver:
    def run():
        from pytrain.kernels.linear_distillation_loss import linear_distillation_loss as launch

        n, hs, ht = 8, 64, 96
        f = FLOATS[dtype]
        launch(torch.empty(n, hs, dtype=f), torch.empty(vocab, hs, dtype=f), torch.empty(n, ht, dtype=f),
               torch.empty(vocab, ht, dtype=f), torch.zeros(n, dtype=torch.int64) if target else None,
               torch.ones(n) if grad else None, kind, 2.0, 0.5, 0.5 if hard else 0.0, -100, 4)

    flags = "".join(f" {name}" for name, on in (("target", target), ("hard", hard), ("grad", grad)) if on)
    return f"linear_distillation_loss {dtype} {kind} V={vocab}{flags}", run


ATTN_MASKS = {  # name: (causal, window_left, window_right)
    "full": (False, -1, -1), "causal": (True, -1, -1), "window": (False, 256, 256), "left-window": (False, 256, -1),
}


def attention(dtype: str, head_dim: int, mask: str, dropout: bool, seed: int = GENERIC_SEED) -> Driver:
    def run():
        from pytrain.kernels.attention import attention_backward, attention_forward

        causal, left, right = ATTN_MASKS[mask]
        p = 0.1 if dropout else 0.0
        q = torch.empty(2, 4, 1024, head_dim, dtype=FLOATS[dtype])
        k = torch.empty(2, 2, 1024, head_dim, dtype=FLOATS[dtype])
        out, lse = attention_forward(q, k, k, 0.125, causal, left, right, p, seed)
        attention_backward(q, q, k, k, out, lse, 0.125, causal, left, right, p, seed)

    drop = f" dropout seed={seed:#x}" if dropout else ""
    return f"attention {dtype} d={head_dim} {mask}{drop}", run


# Mask and dropout flags of the full run: each of HAS_LEFT, HAS_RIGHT, DROPOUT on and off, the common causal +
# dropout and the two-edged window + dropout (the most registers); 4 of the 8 combinations, as 8 take ~25 min.
ATTN_FULL_FLAGS = (("full", False), ("causal", True), ("window", True), ("left-window", False))
# Head dims per D tile: even (D == tile) and masked (D < tile) where the tile allows it.
HEAD_DIMS = (16, 32, 24, 64, 48, 128, 96, 256, 192)


def full() -> Iterator[Driver]:
    for param, state in itertools.product(FLOATS, list(FLOATS) + ["int8"]):
        for master, amsgrad, maximize in itertools.product((False, True), repeat=3):
            if not (amsgrad and state == "int8"):  # pytrain.ops.adamw.unsupported
                yield adamw(param, state, master, amsgrad, maximize)
        yield adamw(param, state, aligned=False)
    for dtype in FLOATS:
        for adapt, mom, nesterov, clip, init in itertools.product((False, True), repeat=5):
            if (mom or not (nesterov or init)) and (adapt or not clip):  # flags that change nothing are left out
                yield lars(dtype, adapt, mom, nesterov, clip, init)
        for adapt, clip in ((False, False), (True, False), (True, True)):
            yield lamb(dtype, adapt, clip)
        yield global_norm(dtype)
        for group in (32, 128, 4096, 16384):
            yield quantize(dtype, "int8", group)
            yield quantize(dtype, "int8", group, True)
            yield quantize(dtype, "int8", group, True, seed=1)
            yield quantize(dtype, "fp8_e4m3", group)
            yield quantize(dtype, "fp8_e5m2", group)
        for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
            yield dequantize(fmt, dtype)
            yield quantize_into(dtype, fmt, 256)
            yield quantize_into(dtype, fmt, 16384)
        yield topk(dtype)
    for fmt, group, feedback in itertools.product(("int8", "fp8_e4m3", "fp8_e5m2"), (256, 16384), (False, True)):
        yield requantize_mean(fmt, group, feedback)
    for rank in (4, 32, 64):
        yield powersgd(rank)
    for dtype, d, (mask, dropout) in itertools.product(FLOATS, HEAD_DIMS, ATTN_FULL_FLAGS):
        yield attention(dtype, d, mask, dropout)
    for dtype, bias, softcap, grad in itertools.product(FLOATS, (False, True), (False, True), (False, True)):
        yield linear_cross_entropy(dtype, bias, softcap, grad)
    yield linear_cross_entropy("bf16", False, False, True, vocab=1003)  # BLOCK below 4096
    for dtype, kind, (target, hard), grad in itertools.product(FLOATS, ("kl", "reverse_kl", "jsd"),
                                                                ((False, False), (True, False), (True, True)),
                                                                (False, True)):
        yield linear_distillation_loss(dtype, kind, target, hard, grad)
    yield linear_distillation_loss("bf16", "kl", True, True, True, vocab=1031)  # BLOCK below 2048


def quick() -> Iterator[Driver]:
    for param in FLOATS:
        yield adamw(param, param)
        yield adamw(param, "int8", master=True, maximize=True)
    yield adamw("bf16", "fp32", master=True, amsgrad=True, maximize=True, aligned=False)
    yield lars("bf16", True, True, nesterov=True, trust_clip=True)
    yield lars("fp32", False, True, init=True)
    yield lamb("fp16", True, True)
    yield lamb("fp32", False)
    yield global_norm("bf16")
    yield quantize("bf16", "int8", 128, True, seed=1)
    yield quantize("fp32", "int8", 16384, True, seed=1)
    yield quantize("fp16", "fp8_e4m3", 4096)
    yield quantize("fp32", "fp8_e5m2", 16384)
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        yield dequantize(fmt, "bf16")
    yield quantize_into("fp32", "int8", 256)
    yield requantize_mean("fp8_e4m3", 256)
    yield requantize_mean("int8", 16384, False)
    yield topk("fp16")
    yield powersgd(4)
    yield linear_cross_entropy("bf16", False, True, True)
    yield attention("bf16", 128, "full", False)
    yield attention("bf16", 128, "window", True, seed=1)
    yield attention("fp16", 64, "causal", False)
    yield attention("fp16", 256, "causal", True)
    yield attention("fp32", 96, "causal", True)
    yield attention("fp32", 64, "left-window", False)
    yield linear_cross_entropy("bf16", True, True, True)
    yield linear_cross_entropy("fp16", False, False, False, vocab=1003)
    yield linear_distillation_loss("bf16", "jsd", True, True, True)
    yield linear_distillation_loss("fp16", "reverse_kl", False, False, True, vocab=1031)


def smoke() -> Iterator[Driver]:
    """One variant of every kernel, seeds of 1 wherever a kernel takes a seed."""
    yield adamw("bf16", "fp32")
    yield lars("bf16", True, True)  # sumsq, segment sums and the update
    yield lamb("fp32", True)
    yield global_norm("fp16")
    yield quantize("bf16", "int8", 128, True, seed=1)  # fused
    yield quantize("fp32", "int8", 16384, True, seed=1)  # absmax + cast
    yield dequantize("fp8_e4m3", "fp32")
    yield requantize_mean("int8", 256)  # fused
    yield requantize_mean("int8", 16384)  # absmax + cast
    yield topk("bf16")
    yield powersgd(4)
    yield linear_cross_entropy("bf16", False, True, True)
    yield linear_distillation_loss("bf16", "jsd", True, True, True)
    yield attention("fp16", 64, "causal", True, seed=1)


MODES = {"full": full, "quick": quick, "smoke": smoke}


# ----------------------------------------------------------------------------------------- compiling
@dataclass
class Result:
    case: str
    kernel: str
    constexprs: str
    num_warps: int = 0
    num_stages: int = 0
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    seconds: float = 0.0
    error: str = ""
    cases: List[str] = field(default_factory=list)


def _ptxas_numbers(log: str) -> Dict[str, Optional[int]]:
    def grab(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {"regs": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def _error_text(e: BaseException) -> str:
    """The error and its causes, innermost last (a CompilationError's own text is only the source position)."""
    parts = []
    while e is not None and len(parts) < 5:
        parts.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _constexpr_text(fn: JITFunction, constexprs: dict) -> str:
    names = [p.name for p in fn.params]
    parts = []
    for path, value in sorted(constexprs.items()):
        value = getattr(value, "name", value)  # tl dtypes by name
        parts.append(f"{names[path[0]]}={value}")
    return " ".join(parts)


def compile_all(drivers: List[Driver], progress: Callable[[str], None]) -> List[Result]:
    launches: List[Launch] = []
    for case, run in drivers:
        with recording(launches, case):
            run()
    results: Dict[tuple, Result] = {}
    for launch in launches:
        fn = launch.fn
        signature, constexprs, attrs, options = jit_specialization(fn, launch.args, launch.kwargs)
        key = (fn.__module__, fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
        if key in results:
            results[key].cases.append(launch.case)
            continue
        module = fn.__module__.rsplit(".", 1)[-1]
        res = Result(launch.case, f"{module}.{fn.__name__}", _constexpr_text(fn, constexprs),
                     options.num_warps, options.num_stages, cases=[launch.case])
        start = time.perf_counter()
        try:
            kernel, log = compile_for_target(fn, signature, constexprs, attrs, options.__dict__)
        except Exception as e:  # noqa: BLE001 (every compile error is reported, with its variant)
            res.error = _error_text(e)
        else:
            for k, v in _ptxas_numbers(log).items():
                setattr(res, k, v)
            res.shared = kernel.metadata.shared
        res.seconds = time.perf_counter() - start
        results[key] = res
        status = "FAILED" if res.error else f"{res.regs} regs, {res.spill_stores} B spilled, {res.shared} B smem"
        progress(f"[{len(results)}] {res.kernel} ({res.case}) {res.seconds:.1f}s: {status}")
    return list(results.values())


# -------------------------------------------------------------------------------------------- report
def _cell(x) -> str:
    return "?" if x is None else str(x)


def report(results: List[Result], mode: str, seconds: float) -> str:
    failed = [r for r in results if r.error]
    spilling = [r for r in results if (r.spill_stores or 0) > 0]
    lines = [
        f"# Triton kernels compiled ahead of time for sm_90 ({mode} run)",
        "",
        f"`python bench/aot_compile.py{'' if mode == 'full' else ' --' + mode}`: {len(results)} variants of "
        f"{len({r.kernel for r in results})} kernels compiled for `GPUTarget('cuda', 90, 64)` with no GPU, in "
        f"{seconds:.0f} s (triton {triton.__version__}, torch {torch.__version__}). "
        "Each variant is what a launcher of kernels/*.py launches for the case named (the first case that "
        "launched it; `cases` counts them), specialised by Triton's JIT binder.",
        "",
        "Columns: registers per thread, spill stores / loads in bytes and stack frame bytes (ptxas -v; Triton's "
        "runtime `n_spills` is the local memory per thread / 4, i.e. stack / 4), shared memory in bytes "
        "(the compiled kernel's `metadata.shared`).",
        "",
        f"**Compile failures: {len(failed)}.** **Variants that spill: {len(spilling)}.**",
        "",
    ]
    if failed:
        lines += ["## Failures", ""]
        lines += [f"- `{r.kernel}` ({r.case}; {r.constexprs}): {r.error.splitlines()[-1][:300]}" for r in failed]
        lines.append("")
    if spilling:
        lines += ["## Spills", ""]
        lines += [f"- `{r.kernel}` ({r.case}; warps {r.num_warps}, stages {r.num_stages}): {r.regs} registers, "
                  f"{r.spill_stores} B spill stores, {r.spill_loads} B spill loads" for r in spilling]
        lines.append("")
    lines += ["## All variants", "",
              "| kernel | case | constexprs | warps | stages | regs | spill st/ld B | stack B | n_spills | shared B | cases | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.kernel} | {r.case} | {r.constexprs} | {r.num_warps} | {r.num_stages} | FAILED | | | | | "
                         f"{len(r.cases)} | {r.seconds:.1f} |")
            continue
        n_spills = None if r.stack is None else r.stack // 4
        lines.append(f"| {r.kernel} | {r.case} | {r.constexprs} | {r.num_warps} | {r.num_stages} | {_cell(r.regs)} | "
                     f"{_cell(r.spill_stores)}/{_cell(r.spill_loads)} | {_cell(r.stack)} | {_cell(n_spills)} | "
                     f"{_cell(r.shared)} | {len(r.cases)} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"report file (default {DEFAULT_OUT.relative_to(ROOT)})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a representative subset (CI)")
    group.add_argument("--smoke", action="store_true", help="one variant of every kernel (tests/test_aot.py)")
    parser.add_argument("--only", default="", help="only the cases whose label contains this text")
    parser.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    drivers = [d for d in MODES[mode]() if args.only in d[0]]
    start = time.perf_counter()
    # A private cache: every variant is compiled (ptxas runs and logs) and the user's cache is left alone.
    with tempfile.TemporaryDirectory(prefix="pytrain-aot-") as cache:
        from triton import knobs

        with knobs.cache.scope():
            knobs.cache.dir = cache
            results = compile_all(drivers, (lambda _: None) if args.quiet else (lambda s: print(s, flush=True)))
    seconds = time.perf_counter() - start
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, mode, seconds))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"COMPILE FAILED: {r.kernel} ({r.case}; {r.constexprs}):\n{r.error}", file=sys.stderr)
    spills = sum((r.spill_stores or 0) > 0 for r in results)
    print(f"{len(results)} variants, {len(failed)} failed, {spills} spill; {seconds:.0f} s; report: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
