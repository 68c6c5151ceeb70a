"""``pytrain.ops.global_norm``: every backend against the reference, step by step (odd, large and single-tensor lists); bit-identical
CPU repeats whatever the thread count; the C++ input checks.  Helpers: ``pytrain/testing/multi_tensor.py``."""

import pytest
import torch

import pytrain.ops as ops
from pytrain.testing.multi_tensor import (FLOATS, IMPLS, LARGE_SHAPES, assert_deterministic, backend_device, cpu_op,
                                          f32, randn)
from pytrain.testing.tolerances import assert_close
from pytrain.testing.optim_compare import ODD_SHAPES


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


def global_norm_args():
    return {"tensors": randn(LARGE_SHAPES, torch.float32, torch.Generator().manual_seed(9))}, {}


def test_cpu_deterministic():
    assert_deterministic("global_norm", global_norm_args)


def test_cpu_input_checks():
    norm = cpu_op("global_norm")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Half, expected Float"):
        norm([f32(3), f32(3, dtype=torch.float16)])
