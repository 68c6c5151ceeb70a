"""GPU: ``lars_step``'s "cuda" and "triton" backends on CUDA tensors against the reference, step by step
(momentum modes, trust clipping, zero tensors and gradients; float32 / bfloat16 / float16; odd sizes, 200
tensors in one launch, ~10M elements)."""
import pytest
import torch

from pytrain.testing import gpu
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.multi_tensor import STEPS, lars_inputs, run_and_compare
from pytrain.optim import FusedLARS
from pytrain.testing.optim_compare import LAYOUTS, ODD_SHAPES, storage_frame_mismatches

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANY_SHAPES = [(1 + (i * 7919) % 4999,) if i % 3 else (1 + i % 13, 1 + (i * 31) % 97) for i in range(197)] + \
    [(1024,), (1,), (1025,)]
LARGE_SHAPES = [(3, 1_000_003), (7_000_001,), (513,)]
# (dtype, momentum mode, adapt, trust_clip): every dtype, mode and flag at least once.
CASES = [("float32", "nesterov", True, False), ("float32", "none", True, True), ("bfloat16", "heavy_ball", True, True),
         ("bfloat16", "dampened", False, False), ("float16", "nesterov", True, True), ("float16", "none", False, False)]


def lars_run(impl, dtype, shapes, momentum_mode, adapt, trust_clip, steps=STEPS, seed=3):
    impl_or_skip("lars_step", impl, gpu.DEVICE)
    inputs = lars_inputs(shapes, FLOATS[dtype], momentum_mode, adapt, trust_clip, steps, seed)
    run_and_compare("lars_step", impl, gpu.DEVICE, *inputs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,momentum_mode,adapt,trust_clip", CASES)
def test_odd_sizes(impl, dtype, momentum_mode, adapt, trust_clip):
    lars_run(impl, dtype, ODD_SHAPES + [(4, 4)], momentum_mode, adapt, trust_clip)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_many_tensors(impl, dtype):
    lars_run(impl, dtype, MANY_SHAPES, "nesterov", adapt=True, trust_clip=True, seed=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_large(impl):
    lars_run(impl, "float32", LARGE_SHAPES, "heavy_ball", adapt=True, trust_clip=False, steps=2, seed=5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [dict(lr=0.5, weight_decay=1e-4, nesterov=True)], ids=["nesterov"])
def test_non_contiguous_params(impl, layout, kwargs):
    """FusedLARS on CUDA params in any layout (channels_last, transposed, sliced) steps them as the contiguous
    kernel steps their storage order, bit for bit."""
    impl_or_skip("lars_step", impl, gpu.DEVICE)
    dtype = torch.float32
    assert storage_frame_mismatches(lambda ps: FusedLARS(ps, impl=impl, **kwargs), layout, dtype, device=gpu.DEVICE) == []
