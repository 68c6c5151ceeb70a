"""The one place where the fused optimizers' hyper-parameters are validated.

Every optimizer lists the group keys it reads (``FusedOptimizer.hyperparameters``); each key has one rule
here, checked on the defaults at construction, on every param group (construction, ``add_param_group``,
``load_state_dict``) and again at each step (a scheduler or a user may have written a group since).
Messages follow torch.optim's (``ValueError("Invalid learning rate: nan")``), prefixed with the optimizer
and the param group, so a bad value is never run: a NaN learning rate, a negative epsilon or weight decay
or a negative LARS trust coefficient would silently corrupt or reverse the training.

Rules (x must be a real number, not a bool or a tensor; nan fails every range):
    lr, eps, weight_decay     finite, >= 0
    betas                     a pair, each finite in [0, 1)
    momentum                  finite, >= 0 (torch.optim.SGD's rule)
    dampening                 finite in [0, 1]
    trust_coefficient         finite, >= 0
    max_grad_norm             None or > 0 (inf allowed: never clips; the norm is still checked)
    flags                     bool
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Iterable

NAMES = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value",
         "momentum": "momentum value", "dampening": "dampening value",
         "trust_coefficient": "trust_coefficient value"}


def _real(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _finite_at_least_zero(key: str, value) -> None:
    x = _real(key, value)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"Invalid {NAMES[key]}: {value} (must be finite and >= 0)")


def _unit_interval(key: str, value) -> None:
    x = _real(key, value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"Invalid {NAMES[key]}: {value} (must be in [0, 1])")


def _betas(key: str, value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid betas: {value!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(value):
        if not 0.0 <= _real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (betas must be in [0, 1))")


def _flag(key: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be a bool, got {type(value).__name__} {value!r}")


RULES: Dict[str, Callable[[str, object], None]] = {
    "lr": _finite_at_least_zero,
    "eps": _finite_at_least_zero,
    "weight_decay": _finite_at_least_zero,
    "momentum": _finite_at_least_zero,
    "trust_coefficient": _finite_at_least_zero,
    "dampening": _unit_interval,
    "betas": _betas,
    **{flag: _flag for flag in ("amsgrad", "maximize", "nesterov", "trust_clip", "always_adapt", "bias_correction",
                                "grad_averaging")},
}


def check_max_grad_norm(value) -> None:
    """``max_grad_norm``: None (no clipping) or a number > 0."""
    if value is not None and not _real("max_grad_norm", value) > 0.0:
        raise ValueError(f"Invalid max_grad_norm: {value} (must be > 0 or None)")


def check_group(owner: str, where: str, group: dict, keys: Iterable[str]) -> None:
    """Checks ``group[key]`` for every key (all must be present); errors name ``owner`` and ``where``."""
    for key in keys:
        if key not in group:
            raise ValueError(f"{owner}: {where} has no '{key}' (and the optimizer has no default for it)")
        try:
            RULES[key](key, group[key])
        except (TypeError, ValueError) as err:
            raise type(err)(f"{owner}: {err} ({where})") from None
