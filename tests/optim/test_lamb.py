"""FusedLAMB against timm's Lamb step by step (timm is a test extra)."""
import math

import pytest
import torch

from pytrain.optim import FusedLAMB
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip
from pytrain.testing.optim_compare import (LAYOUTS, ODD_SHAPES, clone_params, layout_params, make_params,
                                           random_grads, resumed_run_difference, run_side_by_side, states_keep_layout,
                                           storage_frame_mismatches)

timm_optim = pytest.importorskip("timm.optim", reason="timm (test extra) is not installed")

STEPS = 50
STEPS_BY_IMPL = {"triton": 12}
FP32_MAX_REL = 1e-5

CONFIGS = {
    "default": dict(lr=1e-2),
    "no_clip_trust_clip": dict(lr=1e-2, max_grad_norm=None, trust_clip=True, weight_decay=0.1),
    "no_decay": dict(lr=1e-2, weight_decay=0.0),
    "always_adapt_no_bias_correction": dict(lr=5e-3, weight_decay=0.0, always_adapt=True, bias_correction=False),
    "no_grad_averaging": dict(lr=1e-3, grad_averaging=False, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_timm_lamb(impl, config):
    impl_or_skip("lamb_step", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours)
    kwargs = CONFIGS[config]
    worst = run_side_by_side(ours, FusedLAMB(ours, impl=impl, **kwargs), theirs,
                             timm_optim.Lamb(theirs, foreach=False, **kwargs),
                             random_grads(ours, STEPS_BY_IMPL.get(impl, STEPS), scale=2.0))
    assert worst <= FP32_MAX_REL


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_is_timm_in_float64(config):
    ours = make_params(ODD_SHAPES, torch.float64)
    theirs = clone_params(ours)
    kwargs = CONFIGS[config]
    worst = run_side_by_side(ours, FusedLAMB(ours, impl="reference", **kwargs), theirs,
                             timm_optim.Lamb(theirs, foreach=False, **kwargs), random_grads(ours, STEPS, scale=2.0))
    assert worst <= 1e-12


def test_non_finite_grads_skip_the_step():
    params = make_params(ODD_SHAPES)
    opt = FusedLAMB(params)
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt.last_step_skipped and all(torch.equal(a, b) for a, b in zip(before, params))


def test_state_dict_round_trip():
    assert resumed_run_difference(lambda ps: FusedLAMB(ps)) == 0.0


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_match_timm(impl, layout):
    """channels_last conv weights, transposed and sliced weights step as timm steps them."""
    impl_or_skip("lamb_step", impl)
    ours = layout_params(layout)
    theirs = clone_params(ours)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    opt = FusedLAMB(ours, impl=impl, **kwargs)
    worst = run_side_by_side(ours, opt, theirs, timm_optim.Lamb(theirs, foreach=False, **kwargs), random_grads(ours, STEPS_BY_IMPL.get(impl, 10)))
    assert worst <= FP32_MAX_REL
    assert states_keep_layout(opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_step_in_storage_order(layout, dtype):
    """Any layout is the contiguous kernel on the storage order, bit for bit."""
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    assert storage_frame_mismatches(lambda ps: FusedLAMB(ps, **kwargs), layout, dtype) == []
