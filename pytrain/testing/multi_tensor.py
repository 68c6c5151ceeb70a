"""Helpers for testing the backends of the multi-tensor ops (adamw_step, lars_step, lamb_step, global_norm)
against their references: backend selection (or a skip that says why), side-by-side steps compared after
every step, repeated CPU runs for determinism, and direct calls of the C++ kernels.

Each backend ("cpu": C++, "cuda": CUDA C++, "triton") runs the same steps as the reference
(``pytrain/ops/<op>.py``) on identical copies of the inputs.  After every step all outputs are compared
with the per-dtype tolerances of ``tolerances.py``; then the reference's tensors are reset to the
backend's, so each step is checked from identical inputs while the states evolve as in training.
"""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor

import pytrain.ops as ops
from pytrain._extension import triton_interpreted
from pytrain.ops import registry
from pytrain.ops.adamw import INT8_BLOCK
from pytrain.ops.registry import FLOAT_DTYPES

from .tolerances import assert_close, assert_codes_close

IMPLS = ["cpu", "triton", "cuda"]
FLOATS = list(FLOAT_DTYPES)
STEPS = 3
#: Several 64K-element chunks per tensor, partial chunks and int8 blocks: exercises the CPU chunking.
LARGE_SHAPES: List[Tuple[int, ...]] = [(3, 70001), (65536,), (5,)]


def backend_device(op: str, impl: str, dtypes: Sequence[torch.dtype] = (), large: bool = False) -> str:
    """The device to run backend ``impl`` of ``op`` on, or skip the test with the reason it cannot run."""
    if impl == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = registry(op).availability()[impl]
    if why:
        pytest.skip(f"{op}/{impl} unavailable: {why}")
    if impl == "triton":
        # Under TRITON_INTERPRET=1 (set by tests/conftest.py only without a CUDA device) Triton runs CPU tensors
        # through the interpreter, and never CUDA ones; otherwise it runs compiled, on CUDA tensors.
        if triton_interpreted():
            if torch.bfloat16 in dtypes:
                pytest.skip("the Triton interpreter is tested in float32/float16 only")
            if large:
                pytest.skip("the Triton interpreter is tested on small shapes only")
            return "cpu"
        return "cuda"
    return "cuda" if impl == "cuda" else "cpu"


def randn(shapes, dtype, gen: torch.Generator, scale: float = 1.0) -> List[Tensor]:
    return [(scale * torch.randn(s, generator=gen)).to(dtype) for s in shapes]


def with_zero_tensors(shapes, dtype, gen, scale=1.0) -> List[Tensor]:
    """Random tensors, the last one all zeros (its norm is 0: the trust ratio falls back to 1)."""
    ts = randn(shapes, dtype, gen, scale)
    ts[-1].zero_()
    return ts


def zeros(shapes, dtype) -> List[Tensor]:
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def run_and_compare(op: str, impl: str, device: str, lists: Dict[str, List[Tensor]], step_kwargs: List[dict],
                    grads: List[List[Tensor]], codes: Sequence[str] = ()) -> None:
    """Step backend ``impl`` and the reference side by side, comparing every output after every step.

    lists: the op's tensor-list arguments in schema order (CPU tensors; "grads" is set per step).
    codes: names of lists holding int8 / uint8 codes (compared allowing rare rounding ties).
    """
    fn = getattr(ops, op)
    ref = {name: [t.clone() for t in ts] for name, ts in lists.items()}
    dev = {name: [t.to(device, copy=True) for t in ts] for name, ts in lists.items()}
    for step, (kwargs, g) in enumerate(zip(step_kwargs, grads), start=1):
        ref["grads"], dev["grads"] = g, [x.to(device) for x in g]
        fn(*ref.values(), **kwargs, impl="reference")
        fn(*dev.values(), **kwargs, impl=impl)
        for name in lists:
            if name == "grads":
                continue
            for i, (actual, expected) in enumerate(zip(dev[name], ref[name])):
                where = f"{op}/{impl} step {step}: {name}[{i}]"
                if name in codes:
                    assert_codes_close(actual, expected, msg=where)
                else:
                    assert_close(actual, expected, msg=where)
                expected.copy_(actual.cpu())


def cpu_runs(op: str, make_args, threads: Sequence[int]) -> List[List[Tensor]]:
    """Outputs of ``op`` on fresh identical inputs, once per thread count."""
    backend_device(op, "cpu")
    before = torch.get_num_threads()
    outs = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            lists, kwargs = make_args()
            result = getattr(ops, op)(*lists.values(), **kwargs, impl="cpu")
            outs.append([result] if result is not None else [t for ts in lists.values() for t in ts])
    finally:
        torch.set_num_threads(before)
    return outs


def assert_deterministic(op: str, make_args) -> None:
    """Bit-identical outputs of the CPU kernel over repeated runs and thread counts."""
    runs = cpu_runs(op, make_args, threads=[torch.get_num_threads(), torch.get_num_threads(), 1])
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(run, runs[0])):
            assert torch.equal(a, b), f"{op}: output {i} differs between repeated runs"


def cpu_op(name: str):
    """The C++ CPU kernel of ``pytrain::name`` (skips when the extension is not built)."""
    backend_device(name, "cpu")
    return getattr(torch.ops.pytrain, name).default


def f32(*shape, **kw) -> Tensor:
    return torch.zeros(shape, **kw)


# ------------------------------------------------------------------------------------------ inputs per op
ADAMW_VARIANTS = ["plain", "amsgrad", "maximize_scaled", "masters"]
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def adamw_lists(shapes, param_dtype, state, variant, gen) -> Dict[str, List[Tensor]]:
    masters = randn(shapes, torch.float32, gen) if variant == "masters" else []
    params = [m.to(param_dtype) for m in masters] if masters else randn(shapes, param_dtype, gen)
    if state == "int8":
        blocks = [(math.prod(s) + INT8_BLOCK - 1) // INT8_BLOCK for s in shapes]
        exp_avgs, exp_avg_sqs = zeros(shapes, torch.int8), zeros(shapes, torch.uint8)
        scales, sq_scales = zeros(blocks, torch.float32), zeros(blocks, torch.float32)
    else:
        exp_avgs, exp_avg_sqs = zeros(shapes, STATE_DTYPES[state]), zeros(shapes, STATE_DTYPES[state])
        scales, sq_scales = [], []
    return {"params": params, "grads": [], "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
            "max_exp_avg_sqs": zeros(shapes, STATE_DTYPES[state]) if variant == "amsgrad" else [],
            "master_params": masters, "exp_avg_scales": scales, "exp_avg_sq_scales": sq_scales}


def adamw_kwargs(variant: str, step: int) -> dict:
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
                amsgrad=variant == "amsgrad", maximize=variant == "maximize_scaled",
                grad_scale=0.37 if variant == "maximize_scaled" else 1.0)


LARS_MOMENTUM = {"none": (0.0, 0.0, False), "heavy_ball": (0.9, 0.0, False), "dampened": (0.9, 0.1, False),
                 "nesterov": (0.9, 0.0, True)}


def lars_inputs(shapes, dtype, momentum_mode: str, adapt: bool, trust_clip: bool, steps: int, seed: int):
    """(lists, per-step kwargs, per-step grads) of a LARS run: one all-zero param and one zero gradient,
    where the trust ratio falls back to 1."""
    momentum, dampening, nesterov = LARS_MOMENTUM[momentum_mode]
    gen = torch.Generator().manual_seed(seed)
    lists = {"params": with_zero_tensors(shapes, dtype, gen), "grads": [],
             "momentum_buffers": zeros(shapes, dtype) if momentum else []}
    grads = [randn(shapes, dtype, gen, 0.1) for _ in range(steps)]
    grads[0][-2].zero_()  # a zero gradient: trust ratio 1 again
    kwargs = [dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=0.01, trust_coefficient=0.02,
                   eps=1e-8, nesterov=nesterov, trust_clip=trust_clip, adapt=adapt, init_buffers=t == 0)
              for t in range(steps)]
    return lists, kwargs, grads


def lamb_inputs(shapes, dtype, adapt: bool, trust_clip: bool, grad_scale: float, steps: int, seed: int):
    """(lists, per-step kwargs, per-step grads) of a LAMB run with bias corrections of steps 1..steps."""
    gen = torch.Generator().manual_seed(seed)
    lists = {"params": with_zero_tensors(shapes, dtype, gen), "grads": [], "exp_avgs": zeros(shapes, dtype),
             "exp_avg_sqs": zeros(shapes, dtype)}
    grads = [randn(shapes, dtype, gen, 0.1) for _ in range(steps)]
    beta1, beta2 = 0.9, 0.999
    kwargs = [dict(lr=1e-2, beta1=beta1, beta2=beta2, beta3=1 - beta1, eps=1e-6, weight_decay=0.01,
                   bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t, grad_scale=grad_scale,
                   adapt=adapt, trust_clip=trust_clip) for t in range(1, steps + 1)]
    return lists, kwargs, grads


# ------------------------------------------------------------------------------- thread-count independence
def adamw_int8_args():
    gen = torch.Generator().manual_seed(6)
    lists = adamw_lists(LARGE_SHAPES, torch.bfloat16, "int8", "masters", gen)
    lists["grads"] = randn(LARGE_SHAPES, torch.bfloat16, gen, 0.1)
    return lists, adamw_kwargs("masters", 1)


def adamw_float_args():
    gen = torch.Generator().manual_seed(11)
    lists = adamw_lists(LARGE_SHAPES, torch.float32, "float32", "amsgrad", gen)
    lists["grads"] = randn(LARGE_SHAPES, torch.float32, gen, 0.1)
    return lists, adamw_kwargs("amsgrad", 3)


def lars_args():
    gen = torch.Generator().manual_seed(7)
    lists = {"params": randn(LARGE_SHAPES, torch.float32, gen), "grads": randn(LARGE_SHAPES, torch.float32, gen),
             "momentum_buffers": randn(LARGE_SHAPES, torch.float32, gen)}
    return lists, dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, trust_coefficient=0.001, eps=1e-8,
                       nesterov=False, trust_clip=False, adapt=True, init_buffers=False)


def lamb_args():
    gen = torch.Generator().manual_seed(8)
    lists = {"params": randn(LARGE_SHAPES, torch.bfloat16, gen), "grads": randn(LARGE_SHAPES, torch.bfloat16, gen),
             "exp_avgs": zeros(LARGE_SHAPES, torch.bfloat16), "exp_avg_sqs": zeros(LARGE_SHAPES, torch.bfloat16)}
    return lists, dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01,
                       bias_correction1=0.1, bias_correction2=0.001, adapt=True)


def global_norm_args():
    return {"tensors": randn(LARGE_SHAPES, torch.float32, torch.Generator().manual_seed(9))}, {}


#: (op, inputs) of the CPU kernels' determinism checks: several 64K-element chunks per tensor, so 2+ threads
#: split the work (ChunkPlan gives each thread at least 32K elements).
DETERMINISM_CASES: Dict[str, Tuple[str, Callable]] = {
    "adamw_int8": ("adamw_step", adamw_int8_args),
    "adamw_float": ("adamw_step", adamw_float_args),
    "lars": ("lars_step", lars_args),
    "lamb": ("lamb_step", lamb_args),
    "global_norm": ("global_norm", global_norm_args),
}


def output_digest(case: str) -> str:
    """SHA-256 of every output byte of one CPU kernel call of ``DETERMINISM_CASES[case]`` in this process."""
    op, make_args = DETERMINISM_CASES[case]
    (outputs,) = cpu_runs(op, make_args, threads=[torch.get_num_threads()])
    digest = hashlib.sha256()
    for t in outputs:
        digest.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def digests_with_threads(cases: Sequence[str], threads: int) -> Dict[str, str]:
    """``output_digest`` of each case in a fresh process whose OpenMP team has ``threads`` threads
    (OMP_NUM_THREADS, read by torch's pool at start-up)."""
    code = ("import sys; from pytrain.testing.multi_tensor import output_digest; "
            "import torch; assert torch.get_num_threads() == int(sys.argv[1]), torch.get_num_threads(); "
            "print(*[f'{c}={output_digest(c)}' for c in sys.argv[2:]])")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code, str(threads), *cases], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"digest subprocess with OMP_NUM_THREADS={threads} failed:\n{out.stderr[-3000:]}")
    return dict(item.split("=") for item in out.stdout.split())
