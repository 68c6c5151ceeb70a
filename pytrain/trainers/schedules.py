"""Learning-rate schedules for the trainers, as ``torch.optim.lr_scheduler`` objects.

``lr`` is each param group's learning rate when the scheduler is built (the peak), T the run's total steps,
W the warmup steps.  The trainers step a scheduler once per optimizer step, except ``ReduceLROnPlateau``,
which they step with each validation loss (``steps_on_validation``).

* "constant" / None: no scheduler.
* "cosine": linear warmup from lr/W to lr over W steps, then cosine decay
  to ``final`` x lr at the last step (Loshchilov & Hutter 2017, SGDR, without restarts):
  ``lr_t = lr (final + (1 - final) (1 + cos(pi t'/T')) / 2)``, t' and T' counted after warmup.
  A ``LambdaLR`` over a picklable ``WarmupCosine``, so its state_dict round-trips.
* "onecycle": ``OneCycleLR`` peaking at each group's lr after W steps (or 30% of the run when W is 0;
  Smith & Topin 2017).
* "cyclic": ``CyclicLR``, triangular (Smith 2017, arXiv:1506.01186): from lr/10 up to lr in W steps
  (T/10 when W is 0) and back down in as many, again and again.
* "step": linear warmup (``LinearLR``) over W steps (W > 1), then ``MultiStepLR``: x0.1 at half and at three
  quarters of the steps after warmup (the step decay of He et al. 2016).
* "plateau": ``ReduceLROnPlateau``: halves the lr after 2 validations without improvement (patience 1);
  takes no warmup (W must be 0).
* a callable ``fn(optimizer, total_steps) -> LRScheduler``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch.optim.lr_scheduler import (CyclicLR, LambdaLR, LinearLR, LRScheduler, MultiStepLR, OneCycleLR,
                                      ReduceLROnPlateau, SequentialLR)

SCHEDULES = ("constant", "cosine", "onecycle", "cyclic", "step", "plateau")
NEEDS_WARMUP_BELOW_TOTAL = ("cosine", "onecycle", "cyclic", "step")


class WarmupCosine:
    """LR multiplier of step t: linear warmup, then cosine from 1 down to ``final``."""

    def __init__(self, warmup: int, total: int, final: float = 0.1):
        self.warmup, self.total, self.final = warmup, total, final

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_on_validation(scheduler) -> bool:
    """Whether the trainer steps ``scheduler`` with each validation loss (``ReduceLROnPlateau``) rather than once
    per optimizer step."""
    return isinstance(scheduler, ReduceLROnPlateau)


def _with_warmup(optimizer: torch.optim.Optimizer, main: LRScheduler, warmup: int) -> LRScheduler:
    if warmup <= 1:  # one warmup step is the full lr already, as in WarmupCosine
        return main
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_scheduler(schedule: Union[None, str, Callable], optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: int = 0):
    """The scheduler for ``schedule`` (see the module docstring); None for "constant"."""
    if warmup < 0 or (warmup >= total_steps and schedule in NEEDS_WARMUP_BELOW_TOTAL):
        raise ValueError(f"warmup_steps must be in [0, total steps {total_steps}), got {warmup}")
    if schedule is None or schedule == "constant":
        return None
    if schedule == "cosine":
        return LambdaLR(optimizer, WarmupCosine(warmup, total_steps))
    if schedule == "onecycle":
        pct = warmup / total_steps if warmup else 0.3
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                          pct_start=pct)
    if schedule == "cyclic":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return CyclicLR(optimizer, base_lr=[p / 10 for p in peaks], max_lr=peaks,
                        step_size_up=warmup or max(1, total_steps // 10), mode="triangular", cycle_momentum=False)
    if schedule == "step":
        warmup = warmup if warmup > 1 else 0  # one warmup step is the full lr already: no warmup
        after = total_steps - warmup
        milestones = sorted({max(1, after // 2), max(1, 3 * after // 4)})
        return _with_warmup(optimizer, MultiStepLR(optimizer, milestones=milestones, gamma=0.1), warmup)
    if schedule == "plateau":
        if warmup:
            raise ValueError(f"the plateau schedule takes no warmup (it follows the validation loss), got {warmup}")
        return ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    if callable(schedule):
        return schedule(optimizer, total_steps)
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected None, one of {', '.join(SCHEDULES)} or a callable")
