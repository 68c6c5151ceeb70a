"""``pytrain.ops.adamw_step``: every backend against the reference, step by step (float32 / bfloat16 / float16 params; float32, bfloat16 and int8 states; amsgrad, maximize, clipping scale, fp32 masters); bit-identical
CPU repeats whatever the thread count; the C++ input checks.  Helpers: ``pytrain/testing/multi_tensor.py``."""

import pytest
import torch

from pytrain.testing.multi_tensor import (ADAMW_VARIANTS, FLOATS, IMPLS, LARGE_SHAPES, STATE_DTYPES, STEPS,
                                          adamw_int8_args, adamw_kwargs, adamw_lists, assert_deterministic,
                                          backend_device, cpu_op, f32, randn, run_and_compare)
from pytrain.testing.optim_compare import ODD_SHAPES


ADAMW_CASES = [(p, s, v) for p in FLOATS for s in STATE_DTYPES for v in ADAMW_VARIANTS
               if not (s == "int8" and v == "amsgrad")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("param_dtype,state,variant", ADAMW_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_adamw(impl, param_dtype, state, variant):
    state_dtypes = [STATE_DTYPES[state]] if state != "int8" else []
    device = backend_device("adamw_step", impl, [param_dtype, *state_dtypes])
    gen = torch.Generator().manual_seed(1)
    lists = adamw_lists(ODD_SHAPES, param_dtype, state, variant, gen)
    grads = [randn(ODD_SHAPES, param_dtype, gen, 0.1) for _ in range(STEPS)]
    run_and_compare("adamw_step", impl, device, lists, [adamw_kwargs(variant, t) for t in range(1, STEPS + 1)],
                    grads, codes=("exp_avgs", "exp_avg_sqs") if state == "int8" else ())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("state", ["float32", "int8"])
def test_adamw_large(impl, state):
    device = backend_device("adamw_step", impl, large=True)
    gen = torch.Generator().manual_seed(2)
    lists = adamw_lists(LARGE_SHAPES, torch.bfloat16, state, "masters", gen)
    grads = [randn(LARGE_SHAPES, torch.bfloat16, gen, 0.1) for _ in range(2)]
    run_and_compare("adamw_step", impl, device, lists, [adamw_kwargs("masters", t) for t in (1, 2)], grads,
                    codes=("exp_avgs", "exp_avg_sqs") if state == "int8" else ())




def test_cpu_deterministic():
    assert_deterministic("adamw_step", adamw_int8_args)


def adamw_direct(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=(), masters=(), scales=(), sq_scales=(),
                 step=1, amsgrad=False, steps=None):
    """Calls the C++ CPU kernel directly, bypassing the Python checks (``steps``: instead of ``step`` for all)."""
    cpu_op("adamw_step").redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), list(params), list(grads),
                                    list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(masters),
                                    list(scales), list(sq_scales), 1e-3, 0.9, 0.999, 1e-8, 0.0,
                                    [torch.tensor(float(step))] * len(params) if steps is None else steps, amsgrad,
                                    False, 1.0)


ADAMW_BAD_INPUTS = {
    "grads_count": (lambda: adamw_direct([f32(3), f32(2)], [f32(3)], [f32(3)] * 2, [f32(3)] * 2),
                    "grads has 1 tensors, expected 2"),
    "states_count": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3), f32(3)], [f32(3)]),
                     "exp_avgs has 2 tensors, expected 1"),
    "numel": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(4)], [f32(3)]),
              r"exp_avgs\[0\] has 4 elements, params\[0\] has 3"),
    "non_contiguous": (lambda: adamw_direct([f32(4, 3).t()], [f32(3, 4)], [f32(3, 4)], [f32(3, 4)]),
                       r"params\[0\] must be contiguous"),
    "grad_dtype": (lambda: adamw_direct([f32(3)], [f32(3, dtype=torch.float16)], [f32(3)], [f32(3)]),
                   r"grads\[0\] has dtype Half, expected Float"),
    "param_dtype": (lambda: adamw_direct([f32(3, dtype=torch.float64)], [f32(3, dtype=torch.float64)], [f32(3)],
                                         [f32(3)]), "supports float32, bfloat16 and float16"),
    "state_dtype": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3, dtype=torch.float16)],
                                         [f32(3, dtype=torch.float16)]), "states must be float32 or bfloat16"),
    "state_dtypes_differ": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3, dtype=torch.bfloat16)]),
                            r"exp_avg_sqs\[0\] has dtype BFloat16, expected Float"),
    "device": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3, device="meta")], [f32(3)]),
               r"exp_avgs\[0\] is on meta but the params are on cpu"),
    "amsgrad_without_max": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3)], amsgrad=True),
                            "amsgrad=1 but max_exp_avg_sqs has 0 tensors"),
    "step": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3)], step=0), "step must be >= 1"),
    "steps_count": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3)], steps=[]),
                    "steps has 0 tensors, expected 1"),
    "step_on_meta": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3)], steps=[f32(device="meta")]),
                     "one-element real CPU tensor"),
    "step_shape": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3)], [f32(3)], steps=[f32(2)]),
                   "one-element real CPU tensor"),
    "master_dtype": (lambda: adamw_direct([f32(3, dtype=torch.bfloat16)], [f32(3, dtype=torch.bfloat16)], [f32(3)],
                                          [f32(3)], masters=[f32(3, dtype=torch.bfloat16)]),
                     r"master_params\[0\] has dtype BFloat16, expected Float"),
    "int8_scales": (lambda: adamw_direct([f32(300)], [f32(300)], [f32(300, dtype=torch.int8)],
                                         [f32(300, dtype=torch.uint8)], scales=[f32(1)], sq_scales=[f32(2)]),
                    r"exp_avg_scales\[0\] has 1 elements, expected 2"),
    "int8_codes": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3, dtype=torch.uint8)], [f32(3, dtype=torch.uint8)],
                                        scales=[f32(1)], sq_scales=[f32(1)]),
                   r"exp_avgs\[0\] has dtype Byte, expected Char"),
    "int8_amsgrad": (lambda: adamw_direct([f32(3)], [f32(3)], [f32(3, dtype=torch.int8)], [f32(3, dtype=torch.uint8)],
                                          [f32(3, dtype=torch.int8)], scales=[f32(1)], sq_scales=[f32(1)],
                                          amsgrad=True), "amsgrad is not supported with int8 states"),
}


@pytest.mark.parametrize("case", list(ADAMW_BAD_INPUTS))
def test_cpu_adamw_input_checks(case):
    call, message = ADAMW_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=message):
        call()
