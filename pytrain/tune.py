"""``pytrain tune``: hyperparameter search over the main job with Optuna.

An Optuna study (Akiba et al. 2019, arXiv:1907.10902) minimises the best validation loss of ``pytrain train``
runs.  Each trial is a separate ``pytrain train --config trial-<n>/config.json`` process: Optuna's TPE sampler
(Bergstra et al. 2011) picks its settings, the trial reports every validation loss of its JSON-lines log as an
intermediate value, and the pruner (median, or Hyperband: Li et al. 2018, arXiv:1603.06560) stops it when those
fall behind the other trials'.  ``--jobs N`` runs N trials at a time (Optuna's ``n_jobs`` threads, each waiting
on its own process).

The study lives in an SQLite database (Optuna's RDB storage, ``--dir``/study.db): a tune process that is
interrupted leaves its running trials behind, and the next one, started with the same arguments, marks them
failed once their heartbeat is ``3 x --heartbeat`` seconds old and runs their settings again (Optuna's
heartbeat and retry callback); two tune processes on one ``--dir`` (or ``--storage``) share the study.
``--trials N``: the study ends when N trials have finished (complete, pruned or failed; a failure that was
retried counts as its retry); with ``--jobs`` > 1 up to N + jobs - 1 can finish (those already running).

A trial whose process fails (any error exit) or whose loss diverges (a validation loss that is not finite or
above 1.5 x the loss of a uniform guess) is recorded as failed, with the reason, and the study goes on.

At the end: the best trial is printed and its settings written to ``--dir``/best.json, so that
``pytrain train --config best.json`` reproduces it; ``--dir``/history.png and importances.png draw the
optimisation history and the parameter importances (Optuna's matplotlib visualisation; PED-ANOVA importances).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .data import default_corpus
from .train import HOOKS, TrainConfig
from .trainers.tracking import missing

#: the settings a study searches unless the base flags fix them (``pytrain tune --help`` lists them)
SEARCHED = ("lr", "warmup", "weight_decay", "batch", "optimizer", "state_dtype", "hook", "hook_rank",
            "max_grad_norm")
#: what a trial's config must not inherit from the base or pass on to best.json
PER_RUN = {"log_file": None, "tensorboard": None, "checkpoint_dir": None, "checkpoint_every": None,
           "resume": False}
DIVERGED = 1.5  # x the uniform guess's loss: a validation loss above this is a diverged trial
POLL_S = 0.5
#: run in each trial's process: die with the thread that launched it (Linux), then be ``pytrain train``
LAUNCH = ("import ctypes, os, signal, sys\n"
          "if sys.platform.startswith('linux'):\n"
          "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
          "    if os.getppid() != int(os.environ['PYTRAIN_TUNE_PID']):\n"
          "        sys.exit(1)  # the launcher died before prctl: no signal will come\n"
          "from pytrain.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")
EPILOG = f"""Other flags are those of pytrain train and fix the base settings of every trial (e.g. --size tiny
--steps 60 --nproc 1); a searched setting given as a flag is not searched.  Searched: {', '.join(SEARCHED)}.
Files in --dir: study.db (the study), trial-<n>/ (config.json, log.jsonl, output.txt of each trial),
best.json, history.png, importances.png."""


class TrialFailed(Exception):
    """A trial's process failed or its loss diverged (Optuna records the trial as failed and goes on)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pytrain tune", description=__doc__.splitlines()[0], epilog=EPILOG)
    p.add_argument("--trials", type=int, default=8, help="finished trials the study ends at (default: 8)")
    p.add_argument("--jobs", type=int, default=1, help="trials run at a time, each in its own process (default: 1)")
    p.add_argument("--dir", default="pytrain-tune", help="study database, trials, best.json and plots "
                                                          "(default: ./pytrain-tune)")
    p.add_argument("--study", default="pytrain", help="study name in the storage (default: pytrain)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///DIR/study.db)")
    p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                   help="stops trials whose validation losses fall behind (default: median)")
    p.add_argument("--sampler-seed", type=int, default=None, help="seed of the TPE sampler (default: random)")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a running trial's heartbeats; a trial silent for 3x this is failed and "
                        "retried by the next tune process (default: 10)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="TensorBoard event files of each trial in DIR/trial-<n>")
    return p


def _positive(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("trials", "jobs", "heartbeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")


def given_flags(train_argv: List[str]) -> set:
    """Settings that the base flags (or their ``--config``) fix."""
    fixed = {a[2:].split("=")[0].replace("-", "_") for a in train_argv if a.startswith("--")}
    if "config" in fixed:
        path = train_argv[train_argv.index("--config") + 1] if "--config" in train_argv else \
            next(a.split("=", 1)[1] for a in train_argv if a.startswith("--config="))
        with open(path, encoding="utf-8") as f:
            fixed |= set(json.load(f))
    return fixed


def sample(trial, base: TrainConfig, fixed: set) -> Dict[str, object]:
    """The trial's searched settings (Optuna's define-by-run space; conditional ones only where they apply)."""
    out: Dict[str, object] = {}

    def pick(name: str, suggest) -> None:
        if name not in fixed:
            out[name] = suggest()

    world = base.nproc * base.grad_accum
    pick("lr", lambda: trial.suggest_float("lr", 3e-4, 3e-2, log=True))
    if base.schedule not in ("constant", "plateau"):
        pick("warmup", lambda: trial.suggest_int("warmup", 0, base.steps // 4))
    pick("weight_decay", lambda: trial.suggest_float("weight_decay", 1e-4, 0.3, log=True))
    batches = [b for b in (8, 16, 32, 64) if b % world == 0] or [world]
    pick("batch", lambda: trial.suggest_categorical("batch", batches))
    pick("optimizer", lambda: trial.suggest_categorical("optimizer", ["adamw", "lamb", "lars"]))
    if out.get("optimizer", base.optimizer) == "adamw":
        pick("state_dtype", lambda: trial.suggest_categorical("state_dtype", ["float32", "bfloat16", "int8"]))
    if base.shard != "fsdp":  # FSDP reduce-scatters gradients itself: no DDP hook to search
        pick("hook", lambda: trial.suggest_categorical("hook", list(HOOKS)))
    if out.get("hook", base.hook) == "powersgd":
        pick("hook_rank", lambda: trial.suggest_int("hook_rank", 1, 8, log=True))
    pick("max_grad_norm", lambda: trial.suggest_float("max_grad_norm", 0.1, 10.0, log=True))
    return out


def _launch(config_path: Path, out_path: Path) -> subprocess.Popen:
    import pytrain

    env = dict(os.environ)
    root = str(Path(pytrain.__file__).resolve().parents[1])  # the trial runs this pytrain, wherever it is
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTRAIN_TUNE_PID"] = str(os.getpid())
    with open(out_path, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, "train", "--config", str(config_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


def _new_records(path: Path, seen: int) -> Tuple[List[dict], int]:
    """The JSON lines of ``path`` after the first ``seen`` whole ones (a line still being written waits)."""
    if not path.exists():
        return [], seen
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines[seen:]], len(lines)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


class Objective:
    """One trial: sample, write its config, run it as a process, report its validation losses, return the best."""

    def __init__(self, base: TrainConfig, fixed: set, workdir: Path, tensorboard: Optional[str]):
        self.base, self.fixed, self.workdir, self.tensorboard = base, fixed, workdir, tensorboard
        self.limit = DIVERGED * math.log(len(set(default_corpus())))

    def __call__(self, trial) -> float:
        import optuna

        params = sample(trial, self.base, self.fixed)
        tdir = self.workdir / f"trial-{trial.number}"
        tdir.mkdir(parents=True, exist_ok=True)
        settings = {**asdict(self.base), **params, **PER_RUN}
        trial.set_user_attr("config", settings)
        run_settings = {**settings, "log_file": str(tdir / "log.jsonl")}
        if self.tensorboard is not None:
            run_settings["tensorboard"] = str(Path(self.tensorboard) / f"trial-{trial.number}")
        (tdir / "config.json").write_text(json.dumps(run_settings, indent=1))
        proc = _launch(tdir / "config.json", tdir / "output.txt")
        trial.set_user_attr("pid", proc.pid)
        best, seen = math.inf, 0
        try:
            while True:
                done = proc.poll() is not None  # read the log once more after the process ends
                records, seen = _new_records(tdir / "log.jsonl", seen)
                for record in records:
                    if "val_loss" not in record:
                        continue
                    val = float(record["val_loss"])
                    if not val <= self.limit:
                        trial.set_user_attr("reason", f"diverged: validation loss {val} at step {record['step']}")
                        raise TrialFailed(trial.user_attrs["reason"])
                    best = min(best, val)
                    trial.report(val, record["step"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"validation loss {val:.4f} at step {record['step']}")
                if done:
                    break
                time.sleep(POLL_S)
        finally:
            _stop(proc)
        if proc.returncode != 0:
            tail = (tdir / "output.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            trial.set_user_attr("reason", f"exit status {proc.returncode}: {tail[0] if tail else 'no output'}")
            raise TrialFailed(trial.user_attrs["reason"])
        if not math.isfinite(best):
            trial.set_user_attr("reason", "no validation loss in the trial's log (set --eval-every <= --steps)")
            raise TrialFailed(trial.user_attrs["reason"])
        return best


def finished(study) -> int:
    """Trials that count toward ``--trials``: complete, pruned, or failed and not retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}  # set by Optuna's retry callbacks
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried))


def _pruner(name: str, base: TrainConfig):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=base.eval_every, max_resource=base.steps)
    return optuna.pruners.NopPruner()


def _begin_immediate(engine) -> None:
    """Take SQLite's write lock when a transaction begins (``BEGIN IMMEDIATE``), not at its first write.

    SQLite ignores ``SELECT ... FOR UPDATE``, and Python's sqlite3 driver runs a transaction's reads before it
    sends ``BEGIN``; so two threads (``--jobs`` > 1) or two tune processes could both read a queued (waiting)
    trial, both mark it running, and run it twice into one trial directory.  With the lock taken at ``BEGIN``,
    Optuna's read-then-write of a trial's state is atomic.  (SQLAlchemy's recipe for pysqlite transactions.)
    """
    from sqlalchemy import event

    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver sends no BEGIN of its own

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners were attached


def open_study(args: argparse.Namespace, base: TrainConfig):
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_kw = ({"heartbeat_stale_trial_callback": retry(max_retry=1)} if retry is not None else
                    {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)})
        storage = optuna.storages.RDBStorage(
            args.storage or f"sqlite:///{Path(args.dir).resolve() / 'study.db'}",
            engine_kwargs={"connect_args": {"timeout": 60}},  # two tune processes wait for each other's writes
            heartbeat_interval=args.heartbeat, grace_period=3 * args.heartbeat, **retry_kw)
    _begin_immediate(storage.engine)
    return optuna.create_study(study_name=args.study, storage=storage, direction="minimize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=args.sampler_seed),
                               pruner=_pruner(args.pruner, base))


def best_config(study) -> Optional[dict]:
    """The best complete trial's settings (for ``pytrain train --config``), or None when no trial completed."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    return dict(study.best_trial.user_attrs["config"])


def format_study(study) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    lines = [f"study {study.study_name}: {len(trials)} trials: " +
             ", ".join(f"{n} {name}" for name, n in counts.items() if n)]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        why = t.user_attrs.get("reason", "")
        lines.append(f"  trial {t.number:3d}  {t.state.name.lower():8s}  best val {value:>7s}  "
                     + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
                     + (f"  ({why})" if why else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args, train_argv = p.parse_known_args(argv)
    _positive(p, args)
    try:
        import optuna
    except ImportError:
        print(f"pytrain tune: error: {missing('optuna', 'tune', 'pytrain tune')}", file=sys.stderr)
        return 2
    base = TrainConfig.from_args(train_argv)
    fixed = given_flags(train_argv)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(args, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # an interrupted process's trials: failed, queued again
    lock = threading.Lock()

    def enough(study, trial) -> None:
        with lock:
            print(f"pytrain tune: trial {trial.number} {trial.state.name.lower()}"
                  + (f", best val {trial.value:.4f}" if trial.value is not None else "")
                  + (f" ({trial.user_attrs['reason']})" if "reason" in trial.user_attrs else ""), flush=True)
            if finished(study) >= args.trials:
                study.stop()

    remaining = args.trials - finished(study)
    print(f"pytrain tune: study {args.study} in {workdir}: {args.trials - remaining} of {args.trials} trials "
          f"finished, {max(0, remaining)} to run, {args.jobs} at a time", flush=True)
    if remaining > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(Objective(base, fixed, workdir, args.tensorboard), n_trials=remaining, n_jobs=args.jobs,
                           catch=(TrialFailed,), callbacks=[enough], gc_after_trial=False)
    print(format_study(study))
    best = best_config(study)
    if best is None:
        print("pytrain tune: error: no trial completed (see the reasons above)", file=sys.stderr)
        return 1
    (workdir / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    print(f"best: trial {study.best_trial.number}, best val {study.best_value:.4f}; its settings: "
          f"{workdir / 'best.json'} (pytrain train --config {workdir / 'best.json'})")
    from .plot import save_figure, tune_figures

    try:
        figures = tune_figures(study)
    except RuntimeError as exc:  # matplotlib is missing
        print(f"pytrain tune: no plots: {exc}", file=sys.stderr)
        return 0
    for name, fig in figures.items():
        print(f"plot: {save_figure(fig, workdir / f'{name}.png')}")
    return 0
