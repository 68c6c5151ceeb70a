"""``pytrain distill``: a teacher checkpoint of ``pytrain train`` distilled into a smaller student, reported against
the same student trained without a teacher (tiny sizes, a few steps); with hard_label_weight 1 the distilled
student is that student (same seed, batches and steps); clear errors for bad flags and teachers."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytrain.cli import main

REPO = Path(__file__).resolve().parents[1]
STUDENT = ["--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "4", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pytrain", "train", "--nproc", "1", "--size", "tiny", "--steps", "4",
                          "--batch", "4", "--hook", "none", "--no-progress", "--eval-every", "100",
                          "--checkpoint-dir", str(directory)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return directory


def _summary(capsys, *args):
    status = main(["distill", *args])
    out = capsys.readouterr()
    assert status == 0, out.out + out.err
    return json.loads(out.out.splitlines()[-1].removeprefix("summary: ")), out.out


def test_distill_reports_students_with_and_without_teacher(teacher, capsys):
    summary, text = _summary(capsys, "--teacher", str(teacher), "--steps", "3", "--kind", "jsd", "--beta", "0.3",
                             *STUDENT)
    assert summary["teacher_shape"] == {"vocab": 46, "layers": 2, "hidden": 128, "heads": 4, "seq": 64}
    assert summary["teacher"].endswith("step-00000004.pt")
    assert summary["student_params"] < summary["teacher_params"]
    for name in ("baseline", "distilled"):
        assert 0 < summary[name]["val_loss"] < 2 * summary["uniform_loss"]
    assert summary["distilled"]["val_loss"] != summary["baseline"]["val_loss"]
    assert summary["val_gain"] == pytest.approx(summary["baseline"]["val_loss"] - summary["distilled"]["val_loss"])
    assert "student without teacher" in text and "jsd at T = 2.0, beta 0.3" in text


def test_hard_labels_only_is_the_student_without_teacher(teacher, capsys):
    """hard_label_weight 1: the loss is the next-token cross-entropy, so both students see the same seed, batches
    and gradients (up to rounding) and end alike."""
    summary, _ = _summary(capsys, "--teacher", str(teacher / "step-00000004.pt"), "--steps", "3",
                          "--hard-label-weight", "1", *STUDENT)
    assert summary["distilled"]["first_loss"] == pytest.approx(summary["baseline"]["first_loss"], rel=1e-5)
    assert summary["distilled"]["val_loss"] == pytest.approx(summary["baseline"]["val_loss"], rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--kind", "jsd", "--beta", "1"], "--beta must be in (0, 1) for kind 'jsd' (its ends are kinds 'kl' and "
                                        "'reverse_kl')"),
    (["--hard-label-weight", "1.5"], "--hard-label-weight must be in [0, 1], got 1.5"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--hidden", "30", "--heads", "4"], "--hidden 30 is not divisible by --heads 4"),
])
def test_bad_flags(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_teacher_without_checkpoint_or_heads(capsys, tmp_path, teacher):
    assert main(["distill", "--teacher", str(tmp_path)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher), "--teacher-heads", "3", *STUDENT]) == 2
    assert "--teacher-heads 3 does not divide the teacher's width 128" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_default(capsys):
    from pytrain.distill import parser

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when every loss is finite" in text
    for action in parser()._actions:
        if action.dest not in ("help", "teacher"):  # --teacher is required: no default
            assert re.search(r"\w.*\(default: [^)]+\)$", action.help), action.dest
            assert action.option_strings[0] in text
