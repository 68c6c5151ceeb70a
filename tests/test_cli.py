"""The ``pytrain`` command line: the main job end to end on 2 real processes (small and fast), its exit status
and message when the loss did not fall (an error from step 0, a note for a resumed run), a resumed run's summary
(the steps it ran), ``--help`` (every flag with help and default), and its clear errors for bad flags."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytrain.cli import main

REPO = Path(__file__).resolve().parents[1]


def pytrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytrain", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_smoke_two_processes(tmp_path):
    log = tmp_path / "log.jsonl"
    out = pytrain("train", "--steps", "6", "--nproc", "2", "--size", "tiny", "--batch", "8", "--eval-every", "3",
                  "--hook", "allreduce", "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(log),
                  "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.splitlines()[-1].removeprefix("summary: "))
    assert summary["steps"] == 6 and summary["world_size"] == 2
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["tokens_per_s"] > 0 and summary["bytes_sent"] == summary["bytes_uncompressed"] > 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"lr", "grad_norm", "tokens_per_s", "samples_per_s", "bytes_sent"} <= set(steps[0])
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".pytrain.lock", "step-00000006.pt"]


def test_deprecation_warnings_once_per_job():
    """The int8 hook's gather is deprecated in this torch (a FutureWarning the hook's code triggers on every rank):
    the job prints it once, from rank 0."""
    out = pytrain("train", "--steps", "2", "--nproc", "2", "--size", "tiny", "--batch", "4", "--hook", "int8",
                  "--no-progress", "--eval-every", "100")
    assert out.returncode == 0, out.stdout + out.stderr
    warned = re.findall(r"^.*(?:Deprecation|Future)Warning: .*$", out.stderr, re.M)
    assert len(warned) == len(set(warned)) <= 1, out.stderr


@pytest.mark.parametrize("args, message", [
    (["--batch", "7", "--nproc", "2"], "--batch 7 is not divisible by 2 processes"),
    (["--hidden", "100", "--heads", "3"], "--hidden 100 is not divisible by --heads 3"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--resume", "--checkpoint-dir", "{tmp}/missing"], "--resume: checkpoint directory {tmp}/missing does not exist"),
    (["--checkpoint-every", "-1", "--checkpoint-dir", "{tmp}"], "--checkpoint-every must be >= 0 (0: only at the end), "
                                                                "got -1"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--checkpoint-every", "0"], "--checkpoint-every needs --checkpoint-dir"),
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--watchdog-timeout", "-1"], "--watchdog-timeout must be >= 0 seconds (0: off), got -1.0"),
    (["--watchdog-timeout", "nan"], "--watchdog-timeout must be a finite number seconds (0: off), got nan"),
    (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--warmup", "10", "--steps", "10"], "--warmup 10 must be below --steps 10 for the cosine schedule"),
    (["--seq", "100000"], "--seq 100000 is too long for the corpus"),
    (["--patience", "0"], "--patience must be >= 1, got 0"),
    (["--layers", "0"], "--layers must be >= 1, got 0"),
    (["--heads", "0"], "--heads must be >= 1, got 0"),
    (["--seq", "0"], "--seq must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--hook", "gzip"], "invalid choice: 'gzip'"),
    (["--shard", "fsdp", "--hook", "powersgd"], "--hook powersgd is a DDP gradient-communication hook; --shard fsdp "
                                                "reduce-scatters gradients itself"),
    (["--shard", "fsdp", "--precision", "fp16"], "--precision fp16 is not supported with --shard fsdp"),
    (["--no-reshard-after-forward"], "--no-reshard-after-forward needs --shard fsdp"),
    (["--shard", "zero3"], "invalid choice: 'zero3'"),
    (["--dropout", "1"], "--dropout must be below 1, got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be >= 0, got -0.1"),
])
def test_train_bad_flags(capsys, tmp_path, args, message):
    """Rejected before anything runs or is written ({tmp}: a fresh empty directory)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *(a.format(tmp=tmp_path) for a in args)])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_help_documents_every_flag(capsys):
    """``pytrain train --help``: every TrainConfig field is a flag whose help has text and its default."""
    from dataclasses import fields

    from pytrain.train import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):text.index("checkpoints and resume:")]
    entries = {}  # flag -> its help, joined across wrapped lines
    for match in re.finditer(r"^  (--[a-z-]+)(.*?)(?=^  -|\Z)", options, re.M | re.S):
        entries[match.group(1)] = " ".join(match.group(2).split())
    for f in fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in entries, flag
        assert re.search(r"\w+.*\(default: [^)]+\)$", entries[flag]), (flag, entries[flag])


def test_loss_that_did_not_fall_is_explained(tmp_path):
    """lr 0: the loss moves with the batches only (up, for these two of seed 2: 3.822 -> 3.835).  From step 0 that is
    an error (exit 1, naming both losses); in a resumed stretch only a note (exit 0)."""
    args = ["train", "--nproc", "1", "--size", "tiny", "--batch", "4", "--lr", "0", "--hook", "none", "--no-progress",
            "--eval-every", "100", "--seed", "2", "--checkpoint-dir", str(tmp_path)]
    out = pytrain(*args, "--steps", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"pytrain train: error: the loss did not fall over 2 steps from step 0 \(first loss [\d.]+ "
                     r"\(step 1\), last [\d.]+ \(step 2\)\)", out.stderr), out.stderr
    assert "summary: 2 steps on 1 processes" in out.stdout, out.stdout
    out = pytrain(*args, "--steps", "3", "--resume")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "note: the loss did not fall in this resumed stretch of 1 steps" in out.stderr, out.stderr
    # the summary is this run's: one step (3), not three as if all were just run
    assert "summary: 1 steps (steps 3-3 of 3, resumed from step 2) on 1 processes" in out.stdout, out.stdout
    summary = json.loads(out.stdout.splitlines()[-1].removeprefix("summary: "))
    assert (summary["steps"], summary["start_step"], summary["steps_run"]) == (3, 2, 1)


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_cost_and_plan_commands(capsys):
    assert main(["plan", "--params", "1e9", "--layers", "16", "--hidden", "2048", "--top", "2"]) == 0
    assert "configurations fit" in capsys.readouterr().out
    assert main(["cost", "--collective", "25e6"]) == 0
    assert capsys.readouterr().out.strip()
