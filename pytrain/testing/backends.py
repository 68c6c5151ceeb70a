"""Backend selection helpers for tests and benchmarks."""
from __future__ import annotations

from ..ops import registry

#: Backends that can run CPU tensors (Triton through TRITON_INTERPRET=1).
CPU_IMPLS = ("cpu", "reference", "triton")
ALL_IMPLS = ("cpu", "cuda", "triton", "reference")


def impl_or_skip(op: str, name: str) -> str:
    """Skip the calling test (with the reason) when backend ``name`` of ``op`` cannot run here."""
    import pytest

    why = registry(op).availability().get(name, f"no implementation named {name!r}")
    if why:
        pytest.skip(f"{op}/{name} unavailable: {why}")
    return name
