"""Learning-rate schedules for the trainers, as ``torch.optim.lr_scheduler`` objects.

* "constant" / None: no scheduler.
* "cosine": linear warmup from lr/warmup to lr over ``warmup`` steps, then cosine decay
  to ``final`` x lr at the last step (Loshchilov & Hutter 2017, SGDR, without restarts):
  ``lr_t = lr (final + (1 - final) (1 + cos(pi t'/T')) / 2)``, t' and T' counted after warmup.
  A ``LambdaLR`` over a picklable ``WarmupCosine``, so its state_dict round-trips.
* "onecycle": ``torch.optim.lr_scheduler.OneCycleLR`` peaking at each group's lr after
  ``warmup`` steps (or 30% of the run when warmup is 0; Smith & Topin 2017).
* a callable ``fn(optimizer, total_steps) -> LRScheduler``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


class WarmupCosine:
    """LR multiplier of step t: linear warmup, then cosine from 1 down to ``final``."""

    def __init__(self, warmup: int, total: int, final: float = 0.1):
        self.warmup, self.total, self.final = warmup, total, final

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(schedule: Union[None, str, Callable], optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: int = 0) -> Optional[LRScheduler]:
    """The scheduler for ``schedule`` (see the module docstring); stepped once per optimizer step."""
    if warmup < 0 or (warmup >= total_steps and schedule in ("cosine", "onecycle")):
        raise ValueError(f"warmup_steps must be in [0, total steps {total_steps}), got {warmup}")
    if schedule is None or schedule == "constant":
        return None
    if schedule == "cosine":
        return LambdaLR(optimizer, WarmupCosine(warmup, total_steps))
    if schedule == "onecycle":
        pct = warmup / total_steps if warmup else 0.3
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                          pct_start=pct)
    if callable(schedule):
        return schedule(optimizer, total_steps)
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected None, 'constant', 'cosine', 'onecycle' or a callable")
