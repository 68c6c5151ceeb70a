"""GPU: ``adamw_step``'s "cuda" and "triton" backends on CUDA tensors against the reference, step by step
(compiled Triton: tests/conftest.py leaves the interpreter off on CUDA machines).

Covered: float32 / bfloat16 / float16 params with float32, bfloat16 and int8 states (every pair), fp32
masters, amsgrad, maximize with a clipping scale; odd sizes (partial 1024-element programs and 256-element
int8 blocks, a 1-element tensor); 200 tensors of mixed odd sizes in one launch; ~10M elements.
"""

import pytest
import torch

from pytrain.testing import gpu
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.multi_tensor import STATE_DTYPES, STEPS, adamw_kwargs, adamw_lists, randn, run_and_compare
from pytrain.optim import FusedAdamW
from pytrain.testing.optim_compare import LAYOUTS, ODD_SHAPES, storage_frame_mismatches

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: 200 tensors of mixed odd sizes: 1..~5000 elements, some exactly one int8 block or one program, some 1.
MANY_SHAPES = [(1 + (i * 7919) % 4999,) if i % 3 else (1 + i % 13, 1 + (i * 31) % 97) for i in range(196)] + \
    [(256,), (1024,), (1,), (1025,)]
#: ~10M elements: several programs per tensor, partial last program and int8 block.
LARGE_SHAPES = [(3, 1_000_003), (7_000_001,), (513,)]

# Every (param dtype, state) pair with the plain step, then each variant on a few pairs.
CASES = [(p, s, "plain") for p in FLOATS for s in STATE_DTYPES] + [
    ("float32", "float32", "amsgrad"), ("bfloat16", "bfloat16", "amsgrad"), ("float16", "float32", "amsgrad"),
    ("float32", "bfloat16", "maximize_scaled"), ("float16", "int8", "maximize_scaled"),
    ("bfloat16", "float32", "masters"), ("float16", "bfloat16", "masters"), ("bfloat16", "int8", "masters"),
    ("float32", "int8", "masters"),
]


def run(impl, shapes, param, state, variant, steps=STEPS, seed=1):
    impl_or_skip("adamw_step", impl, gpu.DEVICE)
    gen = torch.Generator().manual_seed(seed)
    lists = adamw_lists(shapes, FLOATS[param], state, variant, gen)
    grads = [randn(shapes, FLOATS[param], gen, 0.1) for _ in range(steps)]
    run_and_compare("adamw_step", impl, gpu.DEVICE, lists, [adamw_kwargs(variant, t) for t in range(1, steps + 1)],
                    grads, codes=("exp_avgs", "exp_avg_sqs") if state == "int8" else ())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("param,state,variant", CASES)
def test_odd_sizes(impl, param, state, variant):
    run(impl, ODD_SHAPES + [(4, 4)], param, state, variant)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("param,state,variant", [("float32", "float32", "amsgrad"), ("bfloat16", "int8", "masters"),
                                                 ("float16", "bfloat16", "maximize_scaled")])
def test_many_tensors(impl, param, state, variant):
    run(impl, MANY_SHAPES, param, state, variant, seed=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("state", ["float32", "int8"])
def test_large(impl, state):
    run(impl, LARGE_SHAPES, "bfloat16", state, "masters", steps=2, seed=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [dict(lr=1e-2), dict(lr=1e-2, state_dtype="int8"), dict(lr=1e-2, master_weights=True)], ids=["float32", "int8", "bf16_masters"])
def test_non_contiguous_params(impl, layout, kwargs):
    """FusedAdamW on CUDA params in any layout (channels_last, transposed, sliced) steps them as the contiguous
    kernel steps their storage order, bit for bit."""
    impl_or_skip("adamw_step", impl, gpu.DEVICE)
    dtype = torch.bfloat16 if kwargs.get("master_weights") else torch.float32
    assert storage_frame_mismatches(lambda ps: FusedAdamW(ps, impl=impl, **kwargs), layout, dtype, device=gpu.DEVICE) == []
