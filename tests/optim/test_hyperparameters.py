"""Hyper-parameter validation of the fused optimizers (pytrain/optim/hyperparameters.py): every bad value is a
clear error at construction, in a param group (given, added later, loaded) and at the step after a group was
changed; per-group values without a top-level one work."""
import math

import pytest
import torch

from pytrain.optim import FusedAdamW, FusedLAMB, FusedLARS
from pytrain.testing.optim_compare import clone_params, make_params, random_grads, run_side_by_side

OPTIMIZERS = {"FusedAdamW": FusedAdamW, "FusedLAMB": FusedLAMB, "FusedLARS": FusedLARS}

# (key, bad value, expected error, message) shared by the optimizers that have the key.
COMMON = [
    ("lr", math.nan, ValueError, "Invalid learning rate: nan"),
    ("lr", math.inf, ValueError, "Invalid learning rate: inf"),
    ("lr", -1e-3, ValueError, "Invalid learning rate: -0.001"),
    ("lr", "0.1", TypeError, "lr must be a real number"),
    ("lr", torch.tensor(0.1), TypeError, "lr must be a real number"),
    ("eps", -1e-8, ValueError, "Invalid epsilon value: -1e-08"),
    ("eps", math.nan, ValueError, "Invalid epsilon value: nan"),
    ("weight_decay", -0.1, ValueError, "Invalid weight_decay value: -0.1"),
    ("weight_decay", math.nan, ValueError, "Invalid weight_decay value: nan"),
]
BETAS = [
    ("betas", (1.0, 0.999), ValueError, "Invalid beta parameter at index 0: 1.0"),
    ("betas", (0.9, -0.1), ValueError, "Invalid beta parameter at index 1: -0.1"),
    ("betas", (0.9, math.nan), ValueError, "Invalid beta parameter at index 1: nan"),
    ("betas", (0.9,), ValueError, "Invalid betas"),
]
CASES = {
    "FusedAdamW": COMMON + BETAS + [("amsgrad", 1, TypeError, "amsgrad must be a bool"),
                                    ("maximize", "yes", TypeError, "maximize must be a bool")],
    "FusedLAMB": COMMON + BETAS + [("trust_clip", None, TypeError, "trust_clip must be a bool")],
    "FusedLARS": COMMON + [
        ("trust_coefficient", -1e-3, ValueError, "Invalid trust_coefficient value: -0.001"),
        ("trust_coefficient", math.nan, ValueError, "Invalid trust_coefficient value: nan"),
        ("momentum", -0.9, ValueError, "Invalid momentum value: -0.9"),
        ("momentum", math.nan, ValueError, "Invalid momentum value: nan"),
        ("dampening", math.nan, ValueError, "Invalid dampening value: nan"),
        ("dampening", 1.5, ValueError, "Invalid dampening value: 1.5"),
        ("nesterov", 1, TypeError, "nesterov must be a bool"),
    ],
}
ALL = [(name, *case) for name, cases in CASES.items() for case in cases]
IDS = [f"{name}-{key}={value!r}" for name, key, value, *_ in ALL]


@pytest.mark.parametrize("name,key,value,error,message", ALL, ids=IDS)
def test_bad_value_at_construction(name, key, value, error, message):
    with pytest.raises(error, match=rf"{name}: {message}.*\(defaults\)"):
        OPTIMIZERS[name](make_params([(3,)]), **{key: value})


@pytest.mark.parametrize("name,key,value,error,message", ALL, ids=IDS)
def test_bad_value_in_a_param_group(name, key, value, error, message):
    params = make_params([(3,), (4,)])
    with pytest.raises(error, match=rf"{message}.*\(param group 1\)"):
        OPTIMIZERS[name]([{"params": params[:1]}, {"params": params[1:], key: value}])
    opt = OPTIMIZERS[name]([{"params": params[:1]}])
    with pytest.raises(error, match=rf"{message}.*\(param group 1\)"):
        opt.add_param_group({"params": params[1:], key: value})
    assert len(opt.param_groups) == 1  # the bad group was not kept


@pytest.mark.parametrize("name,key,value,error,message", ALL, ids=IDS)
def test_bad_value_written_into_a_group_fails_the_step(name, key, value, error, message):
    params = make_params([(3,)])
    opt = OPTIMIZERS[name](params)
    params[0].grad = torch.ones(3)
    opt.step()
    before = params[0].detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(error, match=message):
        opt.step()
    assert torch.equal(params[0], before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_value_in_a_loaded_state_dict_replaces_nothing(name):
    params = make_params([(3,)])
    opt = OPTIMIZERS[name](params, lr=0.5)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = math.nan
    with pytest.raises(ValueError, match=r"Invalid learning rate: nan.*saved param group 0"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("name", ["FusedAdamW", "FusedLAMB"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_max_grad_norm(name, value):
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        OPTIMIZERS[name](make_params([(3,)]), max_grad_norm=value)
    params = make_params([(3,)])
    opt = OPTIMIZERS[name](params)
    opt.max_grad_norm = value  # as a trainer may set it later
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        opt.step()


def test_nesterov_rule_per_group():
    params = make_params([(3,), (4,)])
    with pytest.raises(ValueError, match=r"Nesterov momentum requires.*param group 1"):
        FusedLARS([{"params": params[:1]}, {"params": params[1:], "nesterov": True, "momentum": 0.0}])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_per_group_lr_without_a_top_level_one(name):
    """Like every torch optimizer (and timm's Lars): a group's lr needs no top-level lr."""
    ours = make_params([(5, 3), (7,)])
    theirs = clone_params(ours)
    opt = OPTIMIZERS[name]([{"params": ours[:1], "lr": 0.01}, {"params": ours[1:], "lr": 0.03}])
    reference = OPTIMIZERS[name]([{"params": theirs[:1]}, {"params": theirs[1:]}], lr=0.01)
    reference.param_groups[1]["lr"] = 0.03
    assert run_side_by_side(ours, opt, theirs, reference, random_grads(ours, 3)) == 0.0


def test_lars_default_lr_is_timms():
    assert FusedLARS(make_params([(3,)])).defaults["lr"] == 1.0
