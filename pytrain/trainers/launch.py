"""Process-group setup and process launch for pytrain's trainers.

Two ways to start N processes, same training code:

* ``torchrun --nproc-per-node N script.py`` (or any launcher that sets the usual
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): the script calls ``init_distributed()``.
* ``spawn(fn, nproc, *args)`` on one machine: starts ``nproc`` processes, sets the same
  variables in each, calls ``init_distributed()`` and then ``fn(*args)``, and returns
  every rank's result to the caller (``pytrain train --nproc N`` uses this).

The backend follows the device: NCCL with one GPU per local rank when CUDA is
available, gloo on CPU.  On CPU each process gets ``cpu_count // local_world_size``
intra-op threads (at least 1) unless ``OMP_NUM_THREADS`` says otherwise, so N processes
do not oversubscribe the cores.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class SpawnError(RuntimeError):
    """A spawned rank raised; the message carries that rank's traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _set_cpu_threads(local_world_size: int) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: Optional[str] = None, timeout_s: float = 300.0) -> DistInfo:
    """Joins (or creates) the default process group from the environment; idempotent.

    With none of the torchrun variables set, creates a one-process group on 127.0.0.1
    so the same code runs unlaunched.  ``device``: "cpu" or "cuda" to override the
    automatic choice (CUDA when available).  Returns this process's ``DistInfo``.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        if not 0 <= rank < world:
            raise ValueError(f"init_distributed: RANK={rank} outside [0, WORLD_SIZE={world})")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            _set_cpu_threads(_env_int("LOCAL_WORLD_SIZE", world))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(local_rank: int, fn: Callable, nproc: int, port: int, results, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init_distributed()
        results.put((local_rank, _encode(fn(*args)), None))
    except BaseException as exc:  # the parent re-raises it with this rank's traceback
        results.put((local_rank, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args) -> List[Any]:
    """Runs ``fn(*args)`` in ``nproc`` new processes forming one process group; returns their results.

    ``fn`` must be importable (a module-level function: processes start with the
    "spawn" method).  Results come back in rank order (anything ``torch.save`` can
    write).  If a rank raises, the others are stopped and ``SpawnError`` carries the
    exception and traceback of the first rank that failed.
    """
    if nproc < 1:
        raise ValueError(f"spawn: nproc must be >= 1, got {nproc}")
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_worker, args=(fn, nproc, free_port(), results, args), nprocs=nproc,
                                 start_method="spawn", join=False)
    values, errors = {}, {}
    try:
        while not context.join(timeout=0.05):
            _drain(results, values, errors)  # read while running: a large result would fill the pipe
    except ProcessException as exc:
        _drain(results, values, errors)
        rank = next(iter(errors), exc.error_index)  # the first to report: others often fail because it did
        raise SpawnError(f"rank {rank} failed: {errors.get(rank, exc)}") from None
    _drain(results, values, errors)
    return [values[r] for r in range(nproc)]


def _drain(results, values: dict, errors: dict) -> None:
    while not results.empty():
        rank, payload, error = results.get()
        if error is not None:
            errors[rank] = error
        else:
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
