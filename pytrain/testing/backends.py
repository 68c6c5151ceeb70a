"""Backend selection helpers for tests and benchmarks."""
from __future__ import annotations

from .._extension import triton_interpreted
from ..ops import registry

#: Backends that can run CPU tensors (Triton only through TRITON_INTERPRET=1).
CPU_IMPLS = ("cpu", "reference", "triton")
ALL_IMPLS = ("cpu", "cuda", "triton", "reference")


def triton_device() -> str:
    """Where the Triton backend runs here: "cpu" under TRITON_INTERPRET=1 (the interpreter), else "cuda"."""
    return "cpu" if triton_interpreted() else "cuda"


def backend_op(op: str, impl: str):
    """The ``torch.ops.pytrain`` op of backend ``impl``: the C++ kernels (cpu, cuda) sit at the op's own name,
    the others at ``<op>_<impl>`` (pytrain/ops/library.py)."""
    import torch

    return getattr(torch.ops.pytrain, op if impl in ("cpu", "cuda") else f"{op}_{impl}")


def impl_or_skip(op: str, name: str, device: str = "cpu") -> str:
    """Skip the calling test (with the reason) when backend ``name`` of ``op`` cannot run on ``device`` here.

    device: where the test puts its tensors.  Triton runs CPU tensors only through its interpreter
    (TRITON_INTERPRET=1, which tests/conftest.py sets only on machines without a CUDA device), and never
    runs CUDA tensors through it.
    """
    import pytest

    why = registry(op).availability().get(name, f"no implementation named {name!r}")
    if why:
        pytest.skip(f"{op}/{name} unavailable: {why}")
    if name == "triton" and device != triton_device():
        if device == "cpu":
            pytest.skip(f"{op}/triton on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1), which is "
                        f"off on this CUDA machine: Triton is tested compiled, on CUDA tensors")
        pytest.skip(f"{op}/triton on {device} tensors is not run under TRITON_INTERPRET=1")
    return name
