"""Convert a ``torch.optim.AdamW`` / ``Adam`` into ``FusedAdamW`` mid-training, without changing the next step.

    opt = pytrain.optim.from_torch(opt, schedulers=[sched])   # sched now drives the new optimizer

What carries over: every param group with its hyper-parameters and extra keys (``initial_lr``
and others a scheduler set), the per-param state (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``: the tensors are moved, not copied), and the schedulers' binding.  Keys that
only steer torch's implementation choice (foreach, fused, capturable, differentiable) are dropped.
``Adam`` with non-zero weight decay adds the decay to the gradient (L2), which is not AdamW's
decoupled decay, so it is refused unless ``decoupled_weight_decay=True``.  Step the returned
optimizer from now on; the old one shares the state tensors and must not be stepped again.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .adamw import FusedAdamW

TORCH_ONLY_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check(opt: torch.optim.Optimizer) -> None:
    if type(opt) not in (torch.optim.AdamW, torch.optim.Adam):
        raise TypeError(f"from_torch: expected torch.optim.AdamW or torch.optim.Adam, got {type(opt).__name__}")
    for i, group in enumerate(opt.param_groups):
        coupled = type(opt) is torch.optim.Adam and not group.get("decoupled_weight_decay", False)
        if coupled and group["weight_decay"] != 0:
            raise ValueError(f"from_torch: param group {i}: Adam's weight_decay={group['weight_decay']} is L2 "
                             "regularisation, not AdamW's decoupled decay; FusedAdamW would change the result")
        for key in ("lr", "eps", "weight_decay"):
            if torch.is_tensor(group[key]) and group[key].numel() != 1:
                raise ValueError(f"from_torch: param group {i}: {key} must be a scalar")


def _group(group: dict, adam_without_decay: bool) -> dict:
    out = {k: v for k, v in group.items() if k not in TORCH_ONLY_KEYS}
    for key in ("lr", "eps", "weight_decay"):
        out[key] = float(out[key])
    out["betas"] = tuple(float(b) for b in out["betas"])
    if adam_without_decay:
        out["weight_decay"] = 0.0
    return out


def _state(state: dict) -> dict:
    out = {"step": torch.as_tensor(state["step"], dtype=torch.float32).detach().to("cpu").clone()}
    for key in STATE_KEYS:
        if key in state:
            out[key] = state[key].detach()  # any layout: torch's states follow the param's, as ours do
    return out


def _rebind(scheduler, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    if getattr(scheduler, "optimizer", None) is not old:
        raise ValueError(f"from_torch: scheduler {type(scheduler).__name__} is not bound to the given optimizer")
    scheduler.optimizer = new
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _rebind(inner, old, new)


def from_torch(opt: torch.optim.Optimizer, *, schedulers: Iterable = (), **fused_kwargs) -> FusedAdamW:
    """A ``FusedAdamW`` that continues ``opt`` (AdamW, or Adam without L2 decay) exactly.

    Args:
        opt: the torch optimizer, possibly mid-training.
        schedulers: LR schedulers bound to ``opt`` (including SequentialLR / ChainedScheduler); they
            are re-bound to the returned optimizer.
        fused_kwargs: FusedAdamW-only options (``max_grad_norm``, ``impl``...).  Options that change
            the state format (``state_dtype``, ``master_weights``) are refused: the state is carried over.
    """
    _check(opt)
    refused = {"state_dtype", "master_weights"} & set(fused_kwargs)
    if refused:
        raise ValueError(f"from_torch: {sorted(refused)} would change the state format; build FusedAdamW directly")
    adam = type(opt) is torch.optim.Adam
    groups = [_group(g, adam and not g.get("decoupled_weight_decay", False)) for g in opt.param_groups]
    new = FusedAdamW(groups, **fused_kwargs)
    for group in new.param_groups:
        for p in group["params"]:
            if opt.state.get(p):
                new.state[p] = _state(opt.state[p])
    for scheduler in schedulers:
        _rebind(scheduler, opt, new)
    new._opt_called = getattr(opt, "_opt_called", False)  # what torch's schedulers check after a step
    return new
