"""Backends of the fused optimizer ops against the plain-PyTorch reference.

Each backend ("cpu": C++, "cuda": CUDA C++, "triton") runs the same steps as the reference
(``pytrain/testing/optim_ref.py``) on identical copies of the inputs.  After every step all outputs
are compared with the per-dtype tolerances of ``pytrain/testing/tolerances.py``; then the
reference's tensors are reset to the backend's, so each step is checked from identical inputs while
the states evolve as in training.  Also: bit-identical repeats of the CPU kernels (whatever the
thread count) and the C++ input checks.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor

import pytrain.ops as ops
from pytrain.ops import registry
from pytrain.testing.optim_compare import ODD_SHAPES
from pytrain.testing.tolerances import assert_close, assert_codes_close

IMPLS = ["cpu", "triton", "cuda"]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
STEPS = 3
#: Several 64K-element chunks per tensor, partial chunks and int8 blocks: exercises the CPU chunking.
LARGE_SHAPES: List[Tuple[int, ...]] = [(3, 70001), (65536,), (5,)]
#: Kernel module of each op's Triton launcher.
TRITON_MODULES = {"adamw_step": "adamw", "lars_step": "lars", "lamb_step": "lamb", "global_norm": "global_norm"}


def backend_device(op: str, impl: str, dtypes: Sequence[torch.dtype] = (), large: bool = False) -> str:
    """The device to run backend ``impl`` of ``op`` on, or skip the test with the reason it cannot run."""
    if impl == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = registry(op).availability()[impl]
    if why:
        pytest.skip(f"{op}/{impl} unavailable: {why}")
    if impl == "triton":
        module = f"pytrain.kernels.{TRITON_MODULES[op]}"
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{op}/triton unavailable: {module} does not exist")
        if not torch.cuda.is_available():
            if torch.bfloat16 in dtypes:
                pytest.skip("the Triton interpreter is tested in float32/float16 only")
            if large:
                pytest.skip("the Triton interpreter is tested on small shapes only")
            return "cpu"
    return "cuda" if impl in ("cuda", "triton") else "cpu"


def randn(shapes, dtype, gen: torch.Generator, scale: float = 1.0) -> List[Tensor]:
    return [(scale * torch.randn(s, generator=gen)).to(dtype) for s in shapes]


def zeros(shapes, dtype) -> List[Tensor]:
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def run_and_compare(op: str, impl: str, device: str, lists: Dict[str, List[Tensor]], step_kwargs: List[dict],
                    grads: List[List[Tensor]], codes: Sequence[str] = ()) -> None:
    """Step backend ``impl`` and the reference side by side, comparing every output after every step.

    lists: the op's tensor-list arguments in schema order (CPU tensors; "grads" is set per step).
    codes: names of lists holding int8 / uint8 codes (compared allowing rare rounding ties).
    """
    fn = getattr(ops, op)
    ref = {name: [t.clone() for t in ts] for name, ts in lists.items()}
    dev = {name: [t.to(device, copy=True) for t in ts] for name, ts in lists.items()}
    for step, (kwargs, g) in enumerate(zip(step_kwargs, grads), start=1):
        ref["grads"], dev["grads"] = g, [x.to(device) for x in g]
        fn(*ref.values(), **kwargs, impl="reference")
        fn(*dev.values(), **kwargs, impl=impl)
        for name in lists:
            if name == "grads":
                continue
            for i, (actual, expected) in enumerate(zip(dev[name], ref[name])):
                where = f"{op}/{impl} step {step}: {name}[{i}]"
                if name in codes:
                    assert_codes_close(actual, expected, msg=where)
                else:
                    assert_close(actual, expected, msg=where)
                expected.copy_(actual.cpu())


# -------------------------------------------------------------------------------------------- AdamW
ADAMW_VARIANTS = ["plain", "amsgrad", "maximize_scaled", "masters"]
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def adamw_lists(shapes, param_dtype, state, variant, gen) -> Dict[str, List[Tensor]]:
    masters = randn(shapes, torch.float32, gen) if variant == "masters" else []
    params = [m.to(param_dtype) for m in masters] if masters else randn(shapes, param_dtype, gen)
    if state == "int8":
        blocks = [(math.prod(s) + 255) // 256 for s in shapes]
        exp_avgs, exp_avg_sqs = zeros(shapes, torch.int8), zeros(shapes, torch.uint8)
        scales, sq_scales = zeros(blocks, torch.float32), zeros(blocks, torch.float32)
    else:
        exp_avgs, exp_avg_sqs = zeros(shapes, STATE_DTYPES[state]), zeros(shapes, STATE_DTYPES[state])
        scales, sq_scales = [], []
    return {"params": params, "grads": [], "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
            "max_exp_avg_sqs": zeros(shapes, STATE_DTYPES[state]) if variant == "amsgrad" else [],
            "master_params": masters, "exp_avg_scales": scales, "exp_avg_sq_scales": sq_scales}


def adamw_kwargs(variant: str, step: int) -> dict:
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
                amsgrad=variant == "amsgrad", maximize=variant == "maximize_scaled",
                grad_scale=0.37 if variant == "maximize_scaled" else 1.0)


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


# --------------------------------------------------------------------------------------------- LARS
LARS_MOMENTUM = {"none": (0.0, 0.0, False), "heavy_ball": (0.9, 0.0, False), "dampened": (0.9, 0.1, False),
                 "nesterov": (0.9, 0.0, True)}
LARS_CASES = [(m, adapt, clip) for m in LARS_MOMENTUM for adapt in (True, False) for clip in (True, False)
              if adapt or not clip]


def with_zero_tensors(shapes, dtype, gen, scale=1.0) -> List[Tensor]:
    """Random tensors, the last one all zeros (its norm is 0: the trust ratio falls back to 1)."""
    ts = randn(shapes, dtype, gen, scale)
    ts[-1].zero_()
    return ts


def lars_run(impl, dtype, shapes, momentum_mode, adapt, trust_clip, steps=STEPS):
    device = backend_device("lars_step", impl, [dtype], large=shapes is LARGE_SHAPES)
    momentum, dampening, nesterov = LARS_MOMENTUM[momentum_mode]
    gen = torch.Generator().manual_seed(3)
    lists = {"params": with_zero_tensors(shapes, dtype, gen), "grads": [],
             "momentum_buffers": zeros(shapes, dtype) if momentum else []}
    grads = [randn(shapes, dtype, gen, 0.1) for _ in range(steps)]
    grads[0][-2].zero_()  # a zero gradient: trust ratio 1 again
    kwargs = [dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=0.01, trust_coefficient=0.02,
                   eps=1e-8, nesterov=nesterov, trust_clip=trust_clip, adapt=adapt, init_buffers=t == 0)
              for t in range(steps)]
    run_and_compare("lars_step", impl, device, lists, kwargs, grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("momentum_mode,adapt,trust_clip", LARS_CASES)
def test_lars(impl, dtype, momentum_mode, adapt, trust_clip):
    lars_run(impl, dtype, ODD_SHAPES + [(4, 4)], momentum_mode, adapt, trust_clip)


@pytest.mark.parametrize("impl", IMPLS)
def test_lars_large(impl):
    lars_run(impl, torch.float32, LARGE_SHAPES, "nesterov", adapt=True, trust_clip=False, steps=2)


# --------------------------------------------------------------------------------------------- LAMB
def lamb_run(impl, dtype, shapes, adapt, trust_clip, grad_scale, steps=STEPS):
    device = backend_device("lamb_step", impl, [dtype], large=shapes is LARGE_SHAPES)
    gen = torch.Generator().manual_seed(4)
    lists = {"params": with_zero_tensors(shapes, dtype, gen), "grads": [], "exp_avgs": zeros(shapes, dtype),
             "exp_avg_sqs": zeros(shapes, dtype)}
    grads = [randn(shapes, dtype, gen, 0.1) for _ in range(steps)]
    beta1, beta2 = 0.9, 0.999
    kwargs = [dict(lr=1e-2, beta1=beta1, beta2=beta2, beta3=1 - beta1, eps=1e-6, weight_decay=0.01,
                   bias_correction1=1 - beta1**t, bias_correction2=1 - beta2**t, grad_scale=grad_scale,
                   adapt=adapt, trust_clip=trust_clip) for t in range(1, steps + 1)]
    run_and_compare("lamb_step", impl, device, lists, kwargs, grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("adapt,trust_clip", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("grad_scale", [1.0, 0.4])
def test_lamb(impl, dtype, adapt, trust_clip, grad_scale):
    lamb_run(impl, dtype, ODD_SHAPES + [(4, 4)], adapt, trust_clip, grad_scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_large(impl):
    lamb_run(impl, torch.float32, LARGE_SHAPES, adapt=True, trust_clip=True, grad_scale=0.5, steps=2)


# -------------------------------------------------------------------------------------- global_norm
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


# ----------------------------------------------------------------------------- CPU: determinism
def cpu_runs(op: str, make_args, threads: Sequence[int]) -> List[List[Tensor]]:
    """Outputs of ``op`` on fresh identical inputs, once per thread count."""
    backend_device(op, "cpu")
    before = torch.get_num_threads()
    outs = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            lists, kwargs = make_args()
            result = getattr(ops, op)(*lists.values(), **kwargs, impl="cpu")
            outs.append([result] if result is not None else [t for ts in lists.values() for t in ts])
    finally:
        torch.set_num_threads(before)
    return outs


def adamw_int8_args():
    gen = torch.Generator().manual_seed(6)
    lists = adamw_lists(LARGE_SHAPES, torch.bfloat16, "int8", "masters", gen)
    lists["grads"] = randn(LARGE_SHAPES, torch.bfloat16, gen, 0.1)
    return lists, adamw_kwargs("masters", 1)


def lars_args():
    gen = torch.Generator().manual_seed(7)
    lists = {"params": randn(LARGE_SHAPES, torch.float32, gen), "grads": randn(LARGE_SHAPES, torch.float32, gen),
             "momentum_buffers": randn(LARGE_SHAPES, torch.float32, gen)}
    return lists, dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, trust_coefficient=0.001, eps=1e-8,
                       nesterov=False, trust_clip=False, adapt=True, init_buffers=False)


def lamb_args():
    gen = torch.Generator().manual_seed(8)
    lists = {"params": randn(LARGE_SHAPES, torch.bfloat16, gen), "grads": randn(LARGE_SHAPES, torch.bfloat16, gen),
             "exp_avgs": zeros(LARGE_SHAPES, torch.bfloat16), "exp_avg_sqs": zeros(LARGE_SHAPES, torch.bfloat16)}
    return lists, dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01,
                       bias_correction1=0.1, bias_correction2=0.001, adapt=True)


def global_norm_args():
    return {"tensors": randn(LARGE_SHAPES, torch.float32, torch.Generator().manual_seed(9))}, {}


@pytest.mark.parametrize("op,make_args", [("adamw_step", adamw_int8_args), ("lars_step", lars_args),
                                          ("lamb_step", lamb_args), ("global_norm", global_norm_args)],
                         ids=["adamw_int8", "lars", "lamb", "global_norm"])
def test_cpu_deterministic(op, make_args):
    runs = cpu_runs(op, make_args, threads=[torch.get_num_threads(), torch.get_num_threads(), 1])
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(run, runs[0])):
            assert torch.equal(a, b), f"{op}: output {i} differs between repeated runs"


# ----------------------------------------------------------------------------- C++ input checks
def cpu_op(name: str):
    backend_device(name, "cpu")
    return getattr(torch.ops.pytrain, name).default


def adamw_direct(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=(), masters=(), scales=(), sq_scales=(),
                 step=1, amsgrad=False):
    """Calls the C++ CPU kernel directly, bypassing the Python checks."""
    cpu_op("adamw_step").redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), list(params), list(grads),
                                    list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(masters),
                                    list(scales), list(sq_scales), 1e-3, 0.9, 0.999, 1e-8, 0.0, step, amsgrad, False,
                                    1.0)


def f32(*shape, **kw) -> Tensor:
    return torch.zeros(shape, **kw)


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


def test_cpu_lars_lamb_global_norm_input_checks():
    lars = cpu_op("lars_step")
    with pytest.raises(RuntimeError, match="momentum_buffers has 0 tensors, expected 1"):
        lars([f32(3)], [f32(3)], [], 0.1, 0.9, 0.0, 0.0, 1e-3, 1e-8, False, False, True, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] has dtype BFloat16, expected Float"):
        lars([f32(3)], [f32(3)], [f32(3, dtype=torch.bfloat16)], 0.1, 0.9, 0.0, 0.0, 1e-3, 1e-8, False, False, True,
             False)
    lamb = cpu_op("lamb_step")
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] must be contiguous"):
        lamb([f32(4, 3)], [f32(4, 3)], [f32(4, 3)], [f32(3, 4).t()], 1e-3, 0.9, 0.999, 0.1, 1e-6, 0.0, 0.1, 0.001, 1.0,
             True, False)
    with pytest.raises(RuntimeError, match="grads has 2 tensors, expected 1"):
        lamb([f32(3)], [f32(3), f32(3)], [f32(3)], [f32(3)], 1e-3, 0.9, 0.999, 0.1, 1e-6, 0.0, 0.1, 0.001, 1.0, True,
             False)
    norm = cpu_op("global_norm")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Half, expected Float"):
        norm([f32(3), f32(3, dtype=torch.float16)])
