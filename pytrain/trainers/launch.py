"""Process-group setup and process launch for pytrain's trainers.

Two ways to start N processes, same training code:

* ``torchrun --nproc-per-node N script.py`` (or any launcher that sets the usual
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): the script calls ``init_distributed()``.
* ``spawn(fn, nproc, *args)`` on one machine: starts ``nproc`` processes, sets the same
  variables in each, calls ``init_distributed()`` and then ``fn(*args)``, and returns
  every rank's result to the caller (``pytrain train --nproc N`` uses this).  With ``link=EmulatedLink(N, rate)``
  each rank runs in its own network namespace and the ranks talk over links of that rate (``emulated_link``).

Faults under ``spawn``: each rank asks the kernel to SIGKILL it when the launching process dies
(``PR_SET_PDEATHSIG``), so no rank trains on as an orphan.  When ranks fail, ``SpawnError`` names the rank that
failed first: a rank's own failure (its exception, its exit signal or code) before the collective errors it
causes in the others (``is_collective_error``), then by time.

The backend follows the device: NCCL with one GPU per local rank when CUDA is
available, gloo on CPU.  On CPU each process gets ``cpu_count // local_world_size``
intra-op threads (at least 1) unless ``OMP_NUM_THREADS`` says otherwise, so N processes
do not oversubscribe the cores.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .emulated_link import EmulatedLink, RankPlace

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


def spawn_on_link(fn: Callable, nproc: int, rate: Optional[str], *args, **kwargs) -> List[Any]:
    """``spawn``, on an ``EmulatedLink`` of ``rate`` ("1gbit", ...) that exists for the call (None: plain
    ``spawn`` on this machine's loopback).  The link is removed when the call ends, also when a rank failed."""
    if rate is None:
        return spawn(fn, nproc, *args, **kwargs)
    with EmulatedLink(nproc, rate) as link:
        return spawn(fn, nproc, *args, link=link, **kwargs)


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


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective or rendezvous failure, typically the echo of another rank's failure
    (gloo raises plain ``RuntimeError`` s such as "Connection closed by peer"), rather than this rank's own."""
    if isinstance(exc, dist.DistError):  # pytrain's RankFailure included
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in COLLECTIVE_ERROR_MARKS)


COLLECTIVE_ERROR_MARKS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                          "Socket Timeout", "Timed out waiting")
_fatal_reporter: Optional[Callable[[str, bool], None]] = None


def report_fatal(message: str, own: bool) -> None:
    """Tells ``spawn``'s parent (when this process is a spawned rank) why this rank is about to exit abruptly.

    ``own``: the failure is this rank's (it stalled, raised), not an echo of another rank's."""
    if _fatal_reporter is not None:
        _fatal_reporter(message, own)


def _encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent (the launcher) dies (Linux ``PR_SET_PDEATHSIG``);
    elsewhere a daemon thread polls the parent pid.  A launcher that died before this call is caught too."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="pytrain-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def _worker(local_rank: int, fn: Callable, nproc: int, port: int, results, args: tuple, parent_pid: int,
            place: Optional[RankPlace] = None) -> None:
    global _fatal_reporter
    _die_with_parent(parent_pid)
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _fatal_reporter = lambda message, own: results.put((local_rank, None, message, time.time(), own))  # noqa: E731
    try:
        if place is not None:
            os.environ.update(place.enter())
        init_distributed()
        value = _encode(fn(*args))
    except BaseException as exc:  # the parent re-raises it with this rank's traceback
        results.put((local_rank, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", time.time(),
                     not is_collective_error(exc)))
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((local_rank, value, None, time.time(), True))


@dataclass
class _Failure:
    rank: int
    seen: float  # wall-clock time of the failure (the child's, or when the parent saw the exit)
    own: bool  # the rank's own failure, not the echo of another's (a collective error)
    what: str
    reported: bool  # by the rank itself (else seen from its exit status)


class SpawnError(RuntimeError):
    """A spawned rank failed.  The message starts with the rank that failed first (an own failure before echoes
    of it in other ranks: collective errors) and how: its exception and traceback, or its exit signal or code;
    then every other rank's failure.  ``rank``: that rank; ``failures``: rank -> description."""

    def __init__(self, message: str, rank: int, failures: Dict[int, str]):
        super().__init__(message)
        self.rank, self.failures = rank, failures


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def spawn(fn: Callable, nproc: int, *args, timeout_s: Optional[float] = None, grace_s: float = 10.0,
          link: Optional[EmulatedLink] = None) -> List[Any]:
    """Runs ``fn(*args)`` in ``nproc`` new processes forming one process group; returns their results.

    ``fn`` must be importable (a module-level function: processes start with the "spawn" method).  Results come
    back in rank order (anything ``torch.save`` can write).  Each rank is SIGKILLed by the kernel if this
    process dies (no orphans keep training).  If a rank fails, the others get ``grace_s`` seconds to end (and
    report) on their own, then are terminated, and ``SpawnError`` names the rank that failed first and how
    (see ``SpawnError``).  ``timeout_s``: terminate every rank and raise ``SpawnError`` after this long.
    ``link``: an ``EmulatedLink`` of ``nproc`` ranks; rank r then runs in ``link.places[r]``'s network namespace
    and gloo talks over the emulated link (the caller owns the link and closes it, also when this raises).
    """
    if nproc < 1:
        raise ValueError(f"spawn: nproc must be >= 1, got {nproc}")
    if link is not None and link.nproc != nproc:
        raise ValueError(f"spawn: the emulated link joins {link.nproc} ranks, but nproc is {nproc}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port, parent = free_port(), os.getpid()
    procs = [ctx.Process(target=_worker, name=f"pytrain-rank{r}",
                         args=(r, fn, nproc, port, results, args, parent, None if link is None else link.places[r]))
             for r in range(nproc)]
    for p in procs:
        p.start()
    start, values, failures = time.monotonic(), {}, {}
    first_failure_at: Optional[float] = None
    try:
        while any(p.exitcode is None for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None] + [results._reader],
                                            timeout=0.1)
            _drain(results, values, failures)
            for rank, p in enumerate(procs):
                if p.exitcode not in (None, 0) and rank not in failures:
                    failures[rank] = _Failure(rank, time.time(), True, _exit_description(p.exitcode), False)
            now = time.monotonic()
            if failures and first_failure_at is None:
                first_failure_at = now
            if first_failure_at is not None and now - first_failure_at > grace_s:
                break
            if timeout_s is not None and now - start > timeout_s:
                for rank, p in enumerate(procs):
                    if p.exitcode is None:
                        failures.setdefault(rank, _Failure(rank, time.time(), True,
                                                           f"still running after the {timeout_s} s timeout", False))
                break
    finally:
        _stop(procs)
    _drain(results, values, failures)
    if failures:
        raise _spawn_error(failures)
    missing = [r for r in range(nproc) if r not in values]
    if missing:
        raise SpawnError(f"ranks {missing} exited without a result", missing[0], {})
    return [values[r] for r in range(nproc)]


def _stop(procs) -> None:
    """SIGTERM the ranks still running, SIGKILL those that ignore it for 5 s; reap them all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _spawn_error(failures: Dict[int, _Failure]) -> SpawnError:
    first = min(failures.values(), key=lambda f: (not f.own, f.seen))
    others = [f for f in sorted(failures.values(), key=lambda f: f.seen) if f is not first]
    lines = [f"rank {first.rank} failed first: {first.what}"]
    lines += [f"then rank {f.rank}: {f.what.splitlines()[0]}" for f in others]
    return SpawnError("\n".join(lines), first.rank, {f.rank: f.what for f in failures.values()})


def _drain(results, values: dict, failures: Dict[int, _Failure]) -> None:
    while not results.empty():
        rank, payload, error, seen, own = results.get()
        if error is not None:
            if rank not in failures or not failures[rank].reported:  # a report beats the exit status
                failures[rank] = _Failure(rank, seen, own, error, True)
        else:
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
