"""``pytrain.ops.lamb_step``: every backend against the reference, step by step (adapt, trust clipping, clipping scale); bit-identical
CPU repeats whatever the thread count; the C++ input checks.  Helpers: ``pytrain/testing/multi_tensor.py``."""

import pytest
import torch

from pytrain.testing.multi_tensor import (FLOATS, IMPLS, LARGE_SHAPES, STEPS, assert_deterministic, backend_device,
                                          cpu_op, f32, lamb_args, lamb_inputs, run_and_compare)
from pytrain.testing.optim_compare import ODD_SHAPES


def lamb_run(impl, dtype, shapes, adapt, trust_clip, grad_scale, steps=STEPS):
    device = backend_device("lamb_step", impl, [dtype], large=shapes is LARGE_SHAPES)
    run_and_compare("lamb_step", impl, device, *lamb_inputs(shapes, dtype, adapt, trust_clip, grad_scale, steps, 4))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("adapt,trust_clip", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("grad_scale", [1.0, 0.4])
def test_lamb(impl, dtype, adapt, trust_clip, grad_scale):
    lamb_run(impl, dtype, ODD_SHAPES + [(4, 4)], adapt, trust_clip, grad_scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_large(impl):
    lamb_run(impl, torch.float32, LARGE_SHAPES, adapt=True, trust_clip=True, grad_scale=0.5, steps=2)




def test_cpu_deterministic():
    assert_deterministic("lamb_step", lamb_args)


def test_cpu_input_checks():
    lamb = cpu_op("lamb_step")
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] must be contiguous"):
        lamb([f32(4, 3)], [f32(4, 3)], [f32(4, 3)], [f32(3, 4).t()], 1e-3, 0.9, 0.999, 0.1, 1e-6, 0.0, 0.1, 0.001, 1.0,
             True, False)
    with pytest.raises(RuntimeError, match="grads has 2 tensors, expected 1"):
        lamb([f32(3)], [f32(3), f32(3)], [f32(3)], [f32(3)], 1e-3, 0.9, 0.999, 0.1, 1e-6, 0.0, 0.1, 0.001, 1.0, True,
             False)
