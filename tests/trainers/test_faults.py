"""Faults on real processes (gloo, 2 ranks; ``pytrain.testing.fault_scenarios``): a rank that stalls inside its
step or is killed ends every rank within the watchdog's timeout, with errors naming the rank that failed first;
ranks die with their launcher; node-local checkpoint directories that disagree give the same decision on every
rank, or the same clear error; a second job on a checkpoint directory is refused on every rank."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytrain.testing import fault_scenarios as fs
from pytrain.trainers import DirectoryLock, SpawnError, spawn

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 150  # spawn's own timeout: a hang fails the test instead of blocking it


@pytest.mark.parametrize("fault, rank, first, survivor", [
    ("stall", 1, r"RankFailure: rank 1 ended by the watchdog: rank 1 stalled: no progress for [\d.]+ s at step 3 "
                 r"forward \(micro-batch 0\); the others wait at step 3 backward \(micro-batch 0\)",
     r"rank 0 ended by the watchdog: rank 1 stalled"),
    ("kill", 1, "killed by signal SIGKILL", r"RankFailure: rank 0 stopped: rank 1 vanished: no heartbeat for"),
    ("kill", 0, "killed by signal SIGKILL", r"RankFailure: rank 1 stopped: lost the job's rendezvous store"),
])
def test_a_failed_rank_ends_every_rank_naming_it(fault, rank, first, survivor):
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        spawn(fs.faulty_run, 2, fault, rank, timeout_s=BOUND_S)
    error = info.value
    assert error.rank == rank, str(error)
    assert str(error).startswith(f"rank {rank} failed first: ")
    assert set(error.failures) == {0, 1}, str(error)  # both ended on their own, with an error (none was stopped)
    assert re.search(first, error.failures[rank]), error.failures[rank]
    assert re.search(survivor, error.failures[1 - rank]), error.failures[1 - rank]
    assert time.monotonic() - start < BOUND_S


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _children(pid: int) -> list:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def test_ranks_die_with_their_launcher(tmp_path):
    """SIGKILL a training ``pytrain train --nproc 2``: its ranks must not train on as orphans.  Started as a shell
    script's background job (``pytrain train ... &``), which ignores SIGINT: torch's own spawn asks for SIGINT
    when the parent dies, so such ranks used to keep training."""
    log = tmp_path / "log.jsonl"
    launcher = subprocess.Popen([sys.executable, "-m", "pytrain", "train", "--nproc", "2", "--size", "tiny", "--batch",
                                 "4", "--steps", "100000", "--eval-every", "100000", "--hook", "none", "--no-progress",
                                 "--log-file", str(log)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    children = []
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().count("\n") >= 2):  # training
            assert launcher.poll() is None and time.monotonic() < deadline, "the job never started training"
            time.sleep(0.1)
        children = _children(launcher.pid)
        ranks = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(ranks) == 2, children
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in ranks if _running(pid)]
        assert not orphans, f"ranks {orphans} kept training after their launcher was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in children:  # the ranks, and multiprocessing's resource tracker
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    taken = DirectoryLock(tmp_path_factory.mktemp("taken"))  # this process is "another job" on that directory
    try:
        yield spawn(fs.resume_faults, 2, str(tmp_path_factory.mktemp("disks")), str(taken.directory),
                    timeout_s=BOUND_S)
    finally:
        taken.release()


def test_a_second_job_on_a_checkpoint_directory_is_refused(resumed):
    for rank in (0, 1):
        error = resumed[rank]["error_taken"]
        assert error.startswith("CheckpointError: locking ") and "failed on 1 of 2 ranks: rank 0: " in error, error
        assert re.search(rf"checkpoint directory \S+taken\d* is in use by another job \(pid {os.getpid()} on ", error)


@pytest.mark.parametrize("case, message", [
    ("lagging", r"rank 1: checkpoint \S+/rank1/step-00000012.pt does not exist"),
    ("corrupt", r"rank 1: checkpoint \S+/rank1/step-00000012.pt is corrupted"),
])
def test_a_rank_that_cannot_read_the_chosen_checkpoint_fails_every_rank(resumed, case, message):
    for rank in (0, 1):
        error = resumed[rank][f"error_{case}"]
        assert error.startswith("CheckpointError: reading ") and "failed on 1 of 2 ranks" in error, error
        assert re.search(message, error), error
        assert resumed[rank][f"untouched_{case}"]


def test_rank_0_decides_which_checkpoint_to_resume(resumed):
    """Rank 1's disk also holds an (unfinished) step 16; rank 0's latest is step 12: both resume step 12."""
    for rank in (0, 1):
        assert resumed[rank]["error_ahead"] == "no error"
        assert resumed[rank]["step_ahead"] == 12
