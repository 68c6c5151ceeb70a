"""``pytrain.ops.global_norm``: every backend against the reference, step by step (odd, large and single-tensor lists); bit-identical
CPU repeats whatever the thread count; the C++ input checks.  Helpers: ``pytrain/testing/multi_tensor.py``."""

import pytest
import torch

import pytrain.ops as ops
from pytrain.testing.multi_tensor import (FLOATS, IMPLS, LARGE_SHAPES, assert_deterministic, backend_device, cpu_op,
                                          f32, global_norm_args, randn)
from pytrain.testing.tolerances import assert_close, tolerance
from pytrain.testing.optim_compare import LAYOUTS, ODD_SHAPES, layout_params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shapes", ["odd", "large", "single"])
def test_global_norm(impl, dtype, shapes):
    shapes = {"odd": ODD_SHAPES, "large": LARGE_SHAPES, "single": [(1,)]}[shapes]
    device = backend_device("global_norm", impl, [dtype], large=shapes is LARGE_SHAPES)
    tensors = randn(shapes, dtype, torch.Generator().manual_seed(5), 3.0)
    norm = ops.global_norm([t.to(device) for t in tensors], impl=impl)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.device.type == device
    assert_close(norm, ops.global_norm(tensors, impl="reference"), dtype=torch.float32)
    exact = torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))
    assert_close(norm, exact, dtype=torch.float32)




def test_cpu_deterministic():
    assert_deterministic("global_norm", global_norm_args)


def test_cpu_input_checks():
    norm = cpu_op("global_norm")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Half, expected Float"):
        norm([f32(3), f32(3, dtype=torch.float16)])


# Finite values whose float32 squares overflow (> ~1.8e19) or underflow (< ~1e-23), and float64 ones whose float64
# squares do: every backend must sum squares where they stay finite and non-zero (pytrain/ops/global_norm.py).
EXTREMES = {torch.float32: [1e20, 1e-25, 3e30, 1e-38], torch.bfloat16: [1e20, 1e-25],
            torch.float64: [1e200, 1e-200]}
EXTREME_CASES = [(d, v) for d, vs in EXTREMES.items() for v in vs]


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("dtype,value", EXTREME_CASES, ids=str)
def test_global_norm_extreme_values(impl, dtype, value):
    if impl == "reference":
        device = "cpu"
    elif dtype == torch.float64:
        pytest.skip("float64 is served by the reference only")
    else:
        device = backend_device("global_norm", impl, [dtype])
    gen = torch.Generator().manual_seed(10)
    tensors = [(value * torch.rand(s, generator=gen, dtype=torch.float64)).to(dtype) for s in ODD_SHAPES]
    norm = ops.global_norm([t.to(device) for t in tensors], impl=impl)
    exact = value * torch.sqrt(sum((t.double() / value).pow(2).sum() for t in tensors))  # scaled: no overflow here
    _, rtol = tolerance(torch.float32 if dtype != torch.float64 else torch.float64)
    assert torch.isfinite(norm) and norm > 0
    assert abs(float(norm) / float(exact) - 1) <= rtol  # relative: an absolute tolerance would hide 1e-25


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_global_norm_beyond_float32_is_inf(impl):
    device = backend_device("global_norm", impl, [torch.float32]) if impl != "reference" else "cpu"
    norm = ops.global_norm([torch.full((100,), 3e38, device=device)], impl=impl)
    assert norm.dtype == torch.float32 and torch.isinf(norm)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_norm_any_layout(impl, layout):
    """Tensors in any strided layout: the norm of their elements, whatever their order in memory."""
    device = backend_device("global_norm", impl, [torch.float32]) if impl != "reference" else "cpu"
    tensors = layout_params(layout, device=device)
    norm = ops.global_norm(tensors, impl=impl)
    exact = torch.sqrt(sum(t.detach().double().pow(2).sum() for t in tensors))
    assert_close(norm, exact, dtype=torch.float32)
