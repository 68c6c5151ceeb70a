"""A watchdog that ends every rank with a clear error when one rank stalls, vanishes or fails.

Why: a collective waits for every rank.  If one rank sleeps, deadlocks or is frozen inside its step, the others
block until the process group's timeout (300 s by default, and gloo may wait longer), then fail with an error that
names no rank; if one is killed, the others get "Connection closed by peer" without learning which rank died.

How: every rank runs a thread that, every ``interval_s`` seconds, publishes two things in the job's rendezvous
store (the ``TCPStore`` behind ``init_process_group``; the watchdog opens its own connection to it):

* a heartbeat counter (the thread is alive, hence the process);
* the rank's progress: how many marks its main thread has passed (``mark("step 3 forward")`` at each phase of a
  step).  Every rank passes the same marks in the same order, so the counts are comparable across ranks.

and reads every other rank's.  With ``T = timeout_s``:

* a rank whose heartbeat has not moved for T seconds has vanished (killed, frozen, host gone); once a collective
  has failed on this rank (someone is gone), max(3 intervals, 2 s) of silence suffice;
* if this rank's own progress has not moved for T seconds, the job is stalled: the ranks with the fewest marks
  are the ones holding it up (the others wait for them in a collective);
* if the store cannot be reached, the process hosting it (rank 0 under ``spawn`` and ``torchrun``'s default
  static rendezvous, or the launcher) has died.

The first diagnosis any rank makes is recorded in the store (``compare_set``: first writer wins) and every rank
reports that one, so all ranks name the same culprit.  A rank whose main thread raises records its own failure
the same way (``failure(exc)``).  The diagnosis then ends the rank: if the main thread is waiting for it (a
collective failed: ``failure`` asks the watchdog why), it is raised there as ``RankFailure``; otherwise the main
thread is stuck (in a collective or in the stalled code itself) and cannot be interrupted, so the thread prints
the diagnosis, reports it to ``spawn``'s parent and ends the process with ``os._exit(EXIT_CODE)``.

``T`` must exceed the longest phase between two marks on a healthy run (a step, an evaluation, a checkpoint
write).  The watchdog is in use only while ``DDPTrainer.fit`` runs, and only with two or more ranks.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from datetime import timedelta
from typing import List, Optional, Tuple

import torch.distributed as dist

from .launch import is_collective_error, report_fatal

EXIT_CODE = 75  # a rank the watchdog ended (EX_TEMPFAIL: the job may be restarted from its last checkpoint)
_instances = itertools.count()  # one key namespace per watchdog, the same sequence on every rank


class RankFailure(dist.DistError):
    """A rank of the job stalled, vanished or failed; the message names the rank that failed first."""


class Watchdog:
    """Watches the ranks of the default process group; use as a context manager around the training loop.

    Args:
        timeout_s: seconds without a heartbeat (vanished rank) or without progress (stalled job) before the
            job is declared failed.
        interval_s: how often the thread publishes and checks (default: ``timeout_s / 10``, at most 1 s).
    Collective: every rank creates its watchdogs in the same order.
    """

    def __init__(self, timeout_s: float, interval_s: Optional[float] = None):
        if not timeout_s > 0:
            raise ValueError(f"Watchdog: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s is not None else min(1.0, self.timeout_s / 10)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._prefix = f"pytrain/watchdog/{next(_instances)}/"
        self._marks, self._where = 0, "starting"
        self._diagnosis: Optional[str] = None
        self._culprits: List[int] = []
        self._found = threading.Event()  # a diagnosis is ready
        self._main_waiting = threading.Event()  # the main thread waits for one (it is not stuck)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pytrain-watchdog", daemon=True)
        self._store = _own_store_connection(self.timeout_s)

    # ------------------------------------------------------------------------------------ main thread
    def mark(self, where: str) -> None:
        """This rank's main thread reached ``where`` (e.g. "step 3 backward"); cheap (no I/O)."""
        self._marks += 1
        self._where = where

    def failure(self, exc: BaseException) -> BaseException:
        """What to raise for ``exc`` caught by the training loop: for a collective error (the echo of another
        rank's failure), a ``RankFailure`` with the watchdog's diagnosis (waiting for it up to ``timeout_s`` plus
        two intervals); for this rank's own error, ``exc`` itself, after recording it for the other ranks."""
        if not is_collective_error(exc):
            self._record(f"rank {self.rank} raised {type(exc).__name__}: {exc}".strip(), [self.rank])
            return exc
        self._main_waiting.set()
        if self._found.wait(self.timeout_s + 2 * self.interval_s):
            error = RankFailure(f"rank {self.rank} stopped: {self._diagnosis}")
        else:
            error = RankFailure(f"rank {self.rank}: a collective failed ({str(exc).splitlines()[0]}) and the watchdog "
                                f"found no failed rank within {self.timeout_s:.0f} s")
        error.__cause__ = exc
        return error

    def __enter__(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if exc_info[0] is None:
            try:
                self._put("done/", "1")  # the others stop expecting this rank's heartbeat
            except Exception:  # the store's host finished first and exited: nobody is left to watch
                pass

    # ------------------------------------------------------------------------------------ thread
    def _put(self, key: str, value: str) -> None:
        self._store.set(self._prefix + key + str(self.rank), value)

    def _publish(self) -> None:
        self._store.add(self._prefix + f"beat/{self.rank}", 1)
        self._put("progress/", f"{self._marks}|{self._where}")

    def _read(self, key: str) -> List[Optional[str]]:
        keys = [self._prefix + key + str(r) for r in range(self.world)]
        if self._store.check(keys):
            return [v.decode() for v in self._store.multi_get(keys)]
        return [self._store.get(k).decode() if self._store.check([k]) else None for k in keys]

    def _record(self, diagnosis: str, culprits: List[int]) -> Tuple[str, List[int]]:
        """Records ``diagnosis`` (naming ``culprits``) as the job's first failure unless one is recorded already;
        returns the first."""
        entry = f"{','.join(map(str, culprits))}|{diagnosis}"
        try:
            entry = self._store.compare_set(self._prefix + "first", "", entry).decode()
        except Exception:  # the store is gone: this rank's own diagnosis is all there is
            pass
        return _parse(entry)

    def _run(self) -> None:
        start = time.monotonic()
        seen_beats: List[Optional[str]] = [None] * self.world
        beat_moved = [start] * self.world
        my_marks, my_moved = self._marks, start
        done: List[Optional[str]] = [None] * self.world
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._publish()
                beats, progress, done = self._read("beat/"), self._read("progress/"), self._read("done/")
                first = self._store.get(self._prefix + "first").decode() \
                    if self._store.check([self._prefix + "first"]) else None
            except Exception as exc:
                if all(d is not None for r, d in enumerate(done) if r != self.rank):
                    return  # every other rank had finished: the store's host may exit
                self._conclude(f"lost the job's rendezvous store ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                               "the process hosting it (rank 0, or the launcher) has died", [0], record=False)
                return
            if first is not None:
                self._conclude(*_parse(first), record=False)
                return
            for r in range(self.world):
                if beats[r] != seen_beats[r]:
                    seen_beats[r], beat_moved[r] = beats[r], now
            if self._marks != my_marks:
                my_marks, my_moved = self._marks, now
            # once a collective has failed here, some rank is gone: a few missed heartbeats are enough to say which
            silent_s = min(self.timeout_s, max(3 * self.interval_s, 2.0)) if self._main_waiting.is_set() \
                else self.timeout_s
            vanished = [r for r in range(self.world)
                        if r != self.rank and done[r] is None and now - beat_moved[r] > silent_s]
            if vanished:
                self._conclude(f"rank {vanished[0]} vanished: no heartbeat for {now - beat_moved[vanished[0]]:.1f} s "
                               "(killed, frozen, or its host is unreachable)", vanished[:1])
                return
            if now - my_moved > self.timeout_s:
                self._conclude(*_stall_report(progress, done, now - my_moved))
                return

    def _conclude(self, diagnosis: str, culprits: List[int], record: bool = True) -> None:
        self._diagnosis, self._culprits = self._record(diagnosis, culprits) if record else (diagnosis, culprits)
        self._found.set()
        # the main thread gets a chance to raise it; if it does not ask within two intervals (nor finish) it is stuck
        if self._main_waiting.wait(2 * self.interval_s) or self._stop.is_set():
            return
        message = f"rank {self.rank} ended by the watchdog: {self._diagnosis}"
        print(f"pytrain: {message}", file=sys.stderr, flush=True)
        report_fatal(f"RankFailure: {message}", own=self.rank in self._culprits)
        os._exit(EXIT_CODE)


def _parse(entry: str) -> Tuple[str, List[int]]:
    ranks, diagnosis = entry.split("|", 1)
    return diagnosis, [int(r) for r in ranks.split(",") if r]


def _stall_report(progress: List[Optional[str]], done: List[Optional[str]], stalled_s: float) -> Tuple[str, List[int]]:
    """Names the ranks furthest behind (the fewest marks) among those not finished."""
    marks = {r: (int(p.split("|", 1)[0]), p.split("|", 1)[1]) for r, p in enumerate(progress)
             if p is not None and done[r] is None}
    least = min(m for m, _ in marks.values())
    behind = [r for r, (m, _) in marks.items() if m == least]
    where = marks[behind[0]][1]
    others = sorted({w for r, (m, w) in marks.items() if m != least})
    tail = f"; the others wait at {', '.join(others)}" if others else ""
    who = f"rank {behind[0]}" if len(behind) == 1 else f"ranks {', '.join(map(str, behind))}"
    return f"{who} stalled: no progress for {stalled_s:.1f} s at {where}{tail}", behind


def _own_store_connection(timeout_s: float):
    """A new client connection to the default group's ``TCPStore`` (the main thread may be blocked in its own),
    or the default store itself when it is not a ``TCPStore``."""
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return store
