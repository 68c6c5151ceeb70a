"""``pytrain tune``: a 6-trial study with median pruning, a diverging trial recorded as failed, the tune process
killed (SIGKILL) in the middle of a trial and started again: the killed trial's process dies with it, the trial is
marked failed and its settings run again, the study ends at 6 finished trials, and ``pytrain train --config
best.json`` reproduces the best trial's validation loss.  Real processes throughout (a 1-layer model of width 32, 12 steps)."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from pytrain.train import TrainConfig
from pytrain.tune import finished, open_study, parser as tune_parser

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16", "--steps", "12", "--eval-every", "4",
        "--nproc", "1", "--batch", "64", "--optimizer",
        "adamw", "--state-dtype", "float32", "--hook", "none", "--weight-decay", "0.01", "--max-grad-norm", "1"]
ENQUEUED = [{"lr": 3e-3, "warmup": 2}, {"lr": 1e-2, "warmup": 2},  # the two the median pruner starts from
            {"lr": 1e-6, "warmup": 2},  # learns nothing: pruned at its first validation
            {"lr": 1e3, "warmup": 2},  # diverges: failed
            {"lr": 5e-3, "warmup": 3}]  # the trial the kill interrupts
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def tune(workdir: Path, jobs: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytrain", "tune", "--trials", "6", "--jobs", str(jobs), "--dir", str(workdir),
           "--heartbeat", "2", "--sampler-seed", "0", *BASE]
    return subprocess.Popen(cmd, cwd=workdir.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def trial_pid(url: str, workdir: Path, number: int, proc: subprocess.Popen) -> int:
    """The process id of trial ``number`` as soon as tune has launched it (tune records it in the study)."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (workdir / f"trial-{number}" / "config.json").exists():
            trials = optuna.load_study(study_name="pytrain", storage=url).trials
            if len(trials) > number and "pid" in trials[number].user_attrs:
                return trials[number].user_attrs["pid"]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"tune did not launch trial {number}:\n{proc.communicate()[0]}")


def dead(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()  # ended, not yet reaped
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tune") / "study"
    workdir.mkdir()
    url = f"sqlite:///{workdir / 'study.db'}"
    queued = optuna.create_study(study_name="pytrain", storage=url, direction="minimize")
    for params in ENQUEUED:
        queued.enqueue_trial(params)
    first = tune(workdir, jobs=1)
    pid = trial_pid(url, workdir, 4, first)
    # Freeze trial 4 before it can report, so that it is mid-trial (RUNNING) however fast this machine trains,
    # then kill tune.  A trial already past its prctl dies by PR_SET_PDEATHSIG (SIGKILL ends a stopped process);
    # one that was not yet there exits at its parent check once continued.
    os.kill(pid, signal.SIGSTOP)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed = optuna.load_study(study_name="pytrain", storage=url).trials[4]
    with contextlib.suppress(ProcessLookupError):  # gone already: died with tune and was reaped
        os.kill(pid, signal.SIGCONT)
    for _ in range(100):
        if dead(pid):
            break
        time.sleep(0.1)
    time.sleep(6.5)  # past the grace period (3 heartbeats of 2 s): the next tune finds trial 4 stale
    second = tune(workdir, jobs=2)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    return {"dir": workdir, "out": out, "study": optuna.load_study(study_name="pytrain", storage=url),
            "killed": killed, "killed_pid_dead": dead(pid)}


def test_killed_trial_dies_with_tune_and_is_retried(study):
    assert study["killed"].state == TrialState.RUNNING and study["killed_pid_dead"], study["out"]
    trials = study["study"].trials
    assert trials[4].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 4]
    assert len(retries) == 1 and retries[0].params == trials[4].params == ENQUEUED[4]
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_pruned_failed_and_counted(study):
    trials = study["study"].trials
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED,
                                             TrialState.FAIL]
    assert trials[2].last_step == 4  # pruned at its first validation
    assert trials[3].user_attrs["reason"].startswith("diverged: validation loss")
    assert finished(study["study"]) == 6 and len(trials) == 7  # the killed trial counts as its retry
    assert "of 6 trials finished, 2 to run, 2 at a time" in study["out"]


def test_best_json_reproduces_the_best_trial(study, tmp_path):
    best = study["study"].best_trial
    path = study["dir"] / "best.json"
    assert json.loads(path.read_text()) == best.user_attrs["config"]
    cfg = TrainConfig.from_args(["--config", str(path)])
    assert (cfg.lr, cfg.warmup, cfg.steps, cfg.hook) == (best.params["lr"], best.params["warmup"], 12, "none")
    proc = subprocess.run([sys.executable, "-m", "pytrain", "train", "--config", str(path)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("summary: {"))[9:])
    assert math.isclose(summary["best_val_loss"], best.value, rel_tol=1e-4)


def test_tune_plots(study):
    for name in ("history", "importances"):
        with Image.open(study["dir"] / f"{name}.png") as image:
            assert image.size == (800, 450)


def test_a_queued_trial_is_popped_once(tmp_path):
    """Two threads asking at once for the next trial never both get the one that was queued (SQLite ignores
    ``FOR UPDATE``; ``open_study`` begins its transactions IMMEDIATE so that the read-then-write is atomic)."""
    args = tune_parser().parse_args(["--dir", str(tmp_path), "--heartbeat", "60"])
    study = open_study(args, TrainConfig())
    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # asked directly, not by optimize
    for _ in range(20):
        study.enqueue_trial({"lr": 1e-3})
        start, got = threading.Barrier(2), []

        def ask() -> None:
            start.wait()
            got.append(study.ask().number)

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(got)) == 2, got
