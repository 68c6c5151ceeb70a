"""Checkpoint files: atomic writes survive a failing serialiser and a writer killed mid-write; the last K
are kept; unreadable files give clear errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pytrain.trainers.checkpoint import (CheckpointError, atomic_save, checkpoint_name, checkpoint_paths,
                                         latest_checkpoint, load_checkpoint, prune)

REPO = Path(__file__).resolve().parents[2]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("serializer failed")


def good_state(step: int) -> dict:
    return {"step": step, "w": torch.arange(1000, dtype=torch.float32) * step}


def test_round_trip(tmp_path):
    atomic_save(good_state(3), tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["w"], good_state(3)["w"])
    assert os.listdir(tmp_path) == ["a.pt"]


def test_failing_serializer_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / checkpoint_name(1)
    atomic_save(good_state(1), path)
    with pytest.raises(RuntimeError, match="serializer failed"):
        atomic_save({"step": 2, "w": torch.ones(10), "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_writer_killed_mid_write_leaves_the_last_good_checkpoint(tmp_path):
    """A real process is SIGKILLed after writing the new file's bytes, before the rename."""
    path, marker = tmp_path / checkpoint_name(1), tmp_path / "writing"
    atomic_save(good_state(1), path)
    child = f"""
import os, time, torch
from pytrain.trainers.checkpoint import atomic_save
def stalled_fsync(fd):
    open({str(marker)!r}, "w").close()
    time.sleep(120)
os.fsync = stalled_fsync
atomic_save({{"step": 2, "w": torch.ones(100000)}}, {str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before reaching fsync"
            assert time.monotonic() < deadline, "the writer never reached fsync"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    strays = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(strays) == 1 and strays[0].stat().st_size > 0  # the half-done write, under a temporary name
    assert load_checkpoint(path)["step"] == 1
    assert checkpoint_paths(tmp_path) == [path]
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, marker.name])


def test_prune_keeps_the_last_k(tmp_path):
    for step in (3, 10, 7, 12):
        atomic_save(good_state(step), tmp_path / checkpoint_name(step))
    prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == [checkpoint_name(10), checkpoint_name(12)]
    assert latest_checkpoint(tmp_path).name == checkpoint_name(12)
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is unreadable"),
    (b"\x00garbage" * 10, "is unreadable"),
    ("truncated", "is unreadable"),
    ("list", "holds a list, expected a dict"),
])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if content == "truncated":
        atomic_save(good_state(1), path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "list":
        atomic_save([1, 2], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
