"""Helpers for testing the backends of the multi-tensor ops (adamw_step, lars_step, lamb_step, global_norm)
against their references: backend selection (or a skip that says why), side-by-side steps compared after
every step, repeated CPU runs for determinism, and direct calls of the C++ kernels.

Each backend ("cpu": C++, "cuda": CUDA C++, "triton") runs the same steps as the reference
(``pytrain/ops/<op>.py``) on identical copies of the inputs.  After every step all outputs are compared
with the per-dtype tolerances of ``tolerances.py``; then the reference's tensors are reset to the
backend's, so each step is checked from identical inputs while the states evolve as in training.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor

import pytrain.ops as ops
from pytrain._extension import triton_interpreted
from pytrain.ops import registry
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
