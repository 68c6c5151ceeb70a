"""GPU: ``lamb_step``'s "cuda" and "triton" backends on CUDA tensors against the reference, step by step
(adapt, trust clipping, clipping scale, zero tensors; float32 / bfloat16 / float16; odd sizes, 200 tensors in
one launch, ~10M elements)."""
import pytest
import torch

from pytrain.testing import gpu
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.multi_tensor import STEPS, lamb_inputs, run_and_compare
from pytrain.optim import FusedLAMB
from pytrain.testing.optim_compare import LAYOUTS, ODD_SHAPES, storage_frame_mismatches

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANY_SHAPES = [(1 + (i * 7919) % 4999,) if i % 3 else (1 + i % 13, 1 + (i * 31) % 97) for i in range(197)] + \
    [(1024,), (1,), (1025,)]
LARGE_SHAPES = [(3, 1_000_003), (7_000_001,), (513,)]
# (dtype, adapt, trust_clip, grad_scale)
CASES = [("float32", True, False, 1.0), ("float32", False, False, 0.4), ("bfloat16", True, True, 0.4),
         ("bfloat16", False, False, 1.0), ("float16", True, False, 0.4), ("float16", True, True, 1.0)]


def lamb_run(impl, dtype, shapes, adapt, trust_clip, grad_scale, steps=STEPS, seed=4):
    impl_or_skip("lamb_step", impl, gpu.DEVICE)
    inputs = lamb_inputs(shapes, FLOATS[dtype], adapt, trust_clip, grad_scale, steps, seed)
    run_and_compare("lamb_step", impl, gpu.DEVICE, *inputs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,adapt,trust_clip,grad_scale", CASES)
def test_odd_sizes(impl, dtype, adapt, trust_clip, grad_scale):
    lamb_run(impl, dtype, ODD_SHAPES + [(4, 4)], adapt, trust_clip, grad_scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_many_tensors(impl, dtype):
    lamb_run(impl, dtype, MANY_SHAPES, adapt=True, trust_clip=True, grad_scale=0.5, seed=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_large(impl):
    lamb_run(impl, "float32", LARGE_SHAPES, adapt=True, trust_clip=True, grad_scale=0.5, steps=2, seed=6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2, weight_decay=0.1)], ids=["default"])
def test_non_contiguous_params(impl, layout, kwargs):
    """FusedLAMB on CUDA params in any layout (channels_last, transposed, sliced) steps them as the contiguous
    kernel steps their storage order, bit for bit."""
    impl_or_skip("lamb_step", impl, gpu.DEVICE)
    dtype = torch.float32
    assert storage_frame_mismatches(lambda ps: FusedLAMB(ps, impl=impl, **kwargs), layout, dtype, device=gpu.DEVICE) == []
