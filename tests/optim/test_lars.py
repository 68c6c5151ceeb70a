"""FusedLARS against timm's Lars step by step (timm is a test extra; the float64 reference stands in without it)."""
import pytest
import torch

from pytrain.optim import FusedLARS
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip
from pytrain.testing.optim_compare import (LAYOUTS, ODD_SHAPES, clone_params, layout_params, make_params,
                                           random_grads, resumed_run_difference, run_side_by_side, states_keep_layout,
                                           storage_frame_mismatches)

timm_optim = pytest.importorskip("timm.optim", reason="timm (test extra) is not installed")

STEPS = 50
STEPS_BY_IMPL = {"triton": 12}
FP32_MAX_REL = 1e-5

CONFIGS = {
    "sgd_momentum": dict(lr=0.1, momentum=0.9),
    "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-4),
    "larc_nesterov": dict(lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=True, trust_clip=True),
    "always_adapt_no_momentum": dict(lr=0.2, momentum=0.0, always_adapt=True, trust_coefficient=0.01),
    "dampening": dict(lr=0.3, momentum=0.8, dampening=0.1, weight_decay=1e-3),
}


def timm_kwargs(kwargs):
    out = dict(kwargs)
    out["trust_coeff"] = out.pop("trust_coefficient", 1e-3)
    return out


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_timm_lars(impl, config):
    impl_or_skip("lars_step", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours)
    kwargs = CONFIGS[config]
    worst = run_side_by_side(ours, FusedLARS(ours, impl=impl, **kwargs), theirs,
                             timm_optim.Lars(theirs, **timm_kwargs(kwargs)),
                             random_grads(ours, STEPS_BY_IMPL.get(impl, STEPS)))
    assert worst <= FP32_MAX_REL


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_is_timm_in_float64(config):
    ours = make_params(ODD_SHAPES, torch.float64)
    theirs = clone_params(ours)
    kwargs = CONFIGS[config]
    worst = run_side_by_side(ours, FusedLARS(ours, impl="reference", **kwargs), theirs,
                             timm_optim.Lars(theirs, **timm_kwargs(kwargs)), random_grads(ours, STEPS))
    assert worst <= 1e-12


def test_zero_weights_keep_trust_ratio_one():
    ours = [torch.zeros(17, requires_grad=True)]
    theirs = clone_params(ours)
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    worst = run_side_by_side(ours, FusedLARS(ours, **kwargs), theirs, timm_optim.Lars(theirs, **timm_kwargs(kwargs)),
                             random_grads(ours, 3))
    assert worst <= FP32_MAX_REL


def test_state_dict_round_trip():
    assert resumed_run_difference(lambda ps: FusedLARS(ps, lr=0.1, weight_decay=1e-4)) == 0.0


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="Nesterov"):
        FusedLARS(make_params([(3,)]), lr=0.1, momentum=0.0, nesterov=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_match_timm(impl, layout):
    """channels_last conv weights, transposed and sliced weights step as timm steps them."""
    impl_or_skip("lars_step", impl)
    ours = layout_params(layout)
    theirs = clone_params(ours)
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, nesterov=True)
    opt = FusedLARS(ours, impl=impl, **kwargs)
    worst = run_side_by_side(ours, opt, theirs, timm_optim.Lars(theirs, **timm_kwargs(kwargs)), random_grads(ours, STEPS_BY_IMPL.get(impl, 10)))
    assert worst <= FP32_MAX_REL
    assert states_keep_layout(opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_step_in_storage_order(layout, dtype):
    """Any layout is the contiguous kernel on the storage order, bit for bit."""
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, nesterov=True)
    assert storage_frame_mismatches(lambda ps: FusedLARS(ps, **kwargs), layout, dtype) == []
