"""``pytrain.ops.lars_step``: every backend against the reference, step by step (momentum, dampening, nesterov, trust clipping, zero tensors); bit-identical
CPU repeats whatever the thread count; the C++ input checks.  Helpers: ``pytrain/testing/multi_tensor.py``."""

import pytest
import torch

from pytrain.testing.multi_tensor import (FLOATS, IMPLS, LARGE_SHAPES, LARS_MOMENTUM, STEPS, assert_deterministic,
                                          backend_device, cpu_op, f32, lars_args, lars_inputs, run_and_compare)
from pytrain.testing.optim_compare import ODD_SHAPES


LARS_CASES = [(m, adapt, clip) for m in LARS_MOMENTUM for adapt in (True, False) for clip in (True, False)
              if adapt or not clip]


def lars_run(impl, dtype, shapes, momentum_mode, adapt, trust_clip, steps=STEPS):
    device = backend_device("lars_step", impl, [dtype], large=shapes is LARGE_SHAPES)
    run_and_compare("lars_step", impl, device, *lars_inputs(shapes, dtype, momentum_mode, adapt, trust_clip, steps, 3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("momentum_mode,adapt,trust_clip", LARS_CASES)
def test_lars(impl, dtype, momentum_mode, adapt, trust_clip):
    lars_run(impl, dtype, ODD_SHAPES + [(4, 4)], momentum_mode, adapt, trust_clip)


@pytest.mark.parametrize("impl", IMPLS)
def test_lars_large(impl):
    lars_run(impl, torch.float32, LARGE_SHAPES, "nesterov", adapt=True, trust_clip=False, steps=2)




def test_cpu_deterministic():
    assert_deterministic("lars_step", lars_args)


def test_cpu_input_checks():
    lars = cpu_op("lars_step")
    with pytest.raises(RuntimeError, match="momentum_buffers has 0 tensors, expected 1"):
        lars([f32(3)], [f32(3)], [], 0.1, 0.9, 0.0, 0.0, 1e-3, 1e-8, False, False, True, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has dtype BFloat16, expected Float"):
        lars([f32(3)], [f32(3)], [f32(3, dtype=torch.bfloat16)], 0.1, 0.9, 0.0, 0.0, 1e-3, 1e-8, False, False, True,
             False)
