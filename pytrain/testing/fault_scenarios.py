"""Fault scenarios for the trainer fault tests, run on real processes (``pytrain.trainers.spawn``, gloo, 2 ranks).

Spawned processes import their function by module name, so the scenarios live here.  The faults are real: a
rank sleeps inside its step, or sends itself SIGKILL; node-local checkpoint directories are separate
directories holding different files.  Problem and model: those of
``ddp_scenarios``.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from ..trainers.checkpoint import CheckpointError, checkpoint_name
from . import ddp_scenarios as sc

WATCHDOG_S = 5.0  # the tests' watchdog timeout: far above a step of this problem (milliseconds)
FAULT_STEP = 3


class FaultyLoss:
    """``mse_loss`` that, on ``rank``'s ``FAULT_STEP``-th call, stalls (sleeps 10 minutes) or kills its process."""

    def __init__(self, fault: str, rank: int):
        if fault not in ("stall", "kill"):
            raise ValueError(f"unknown fault {fault!r}")
        self.fault, self.rank, self.calls = fault, rank, 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == FAULT_STEP and dist.get_rank() == self.rank:
            if self.fault == "stall":
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.mse_loss(output, target)


def faulty_run(fault: str, rank: int) -> None:
    """A 50-step run in which ``rank`` stalls or dies at step ``FAULT_STEP``; must end with an error on every rank."""
    sc.trainer(sc.model(), loss_fn=FaultyLoss(fault, rank), max_steps=50, watchdog_timeout=WATCHDOG_S).fit()


def _error(fn) -> str:
    try:
        fn()
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    return "no error"


def resume_faults(tmp: str, taken: str) -> Dict[str, object]:
    """Resumes from node-local checkpoint directories that disagree: ``<tmp>/rank<r>`` is rank r's disk.

    Rank 0 trains 12 steps, checkpointing every 4 (its disk keeps steps 8 and 12).  Rank 1's disk then holds:
    "lagging": only step 8; "corrupt": step 12 with one flipped byte; "ahead": step 12 and an unfinished step 16.
    Every resume is ``resume=True`` from the rank's own disk: rank 0 decides (step 12), so "ahead" resumes step 12
    on both ranks and the others fail on every rank, naming rank 1 and leaving the model untouched.  Last, a
    trainer on ``taken``, a directory another job (the caller) holds: "error_taken"."""
    tmp, rank = Path(tmp), dist.get_rank()
    disk = tmp / f"rank{rank}"
    disk.mkdir(parents=True, exist_ok=True)
    sc.trainer(sc.model(), checkpoint_dir=str(disk), checkpoint_every=4, keep_last=2).fit()
    twelve = tmp / "rank0" / checkpoint_name(12)
    out: Dict[str, object] = {}
    for case in ("lagging", "corrupt", "ahead"):
        if rank == 1:
            for old in disk.glob("step-*.pt"):
                old.unlink()
            shutil.copy(tmp / "rank0" / checkpoint_name(8), disk)
            if case in ("corrupt", "ahead"):
                data = bytearray(twelve.read_bytes())
                if case == "corrupt":
                    data[len(data) // 2] ^= 0x01
                (disk / checkpoint_name(12)).write_bytes(data)
            if case == "ahead":
                (disk / checkpoint_name(16)).write_bytes(b"half-copied")
        dist.barrier()
        net = sc.model(seed=7)
        before = sc.params(net)
        holder = {}
        out[f"error_{case}"] = _error(lambda: holder.setdefault(
            "trainer", sc.trainer(net, checkpoint_dir=str(disk), resume=True)))
        out[f"step_{case}"] = holder["trainer"].step if holder else None
        out[f"untouched_{case}"] = all(torch.equal(a, b) for a, b in zip(before, sc.params(net)))
        if holder:
            holder["trainer"].close()
        dist.barrier()
    out["error_taken"] = _error(lambda: sc.trainer(sc.model(), checkpoint_dir=taken))
    return out
