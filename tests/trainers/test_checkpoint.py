"""Checkpoint files: atomic writes survive a failing serialiser, a full disk and a writer killed mid-write; the
last K are kept; prune spares other live writers' files; one job per directory; every damaged, foreign or
truncated file is a clear CheckpointError."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pytrain.trainers.checkpoint import (HEADER_BYTES, CheckpointError, DirectoryLock, atomic_save, checkpoint_name,
                                         checkpoint_paths, latest_checkpoint, load_checkpoint, prune)

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


def start_child(code: str, marker: Path) -> subprocess.Popen:
    """A real Python process running ``code``, once it has created ``marker`` (it must, within 90 s)."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, "the child exited before creating its marker"
            assert time.monotonic() < deadline, "the child never created its marker"
            time.sleep(0.05)
    except BaseException:
        kill(proc)
        raise
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def stalled_writer(path: Path, marker: Path, lock: Path = None) -> subprocess.Popen:
    """A process writing a checkpoint to ``path``, stalled after writing the bytes, before the rename (holding
    ``lock``'s directory while it runs, when given: another job)."""
    return start_child(f"""
import os, time, torch
from pytrain.trainers.checkpoint import DirectoryLock, atomic_save
held = {"None" if lock is None else f"DirectoryLock({str(lock)!r})"}
def stalled_fsync(fd):
    open({str(marker)!r}, "w").close()
    time.sleep(120)
os.fsync = stalled_fsync
atomic_save({{"step": 2, "w": torch.ones(100000)}}, {str(path)!r})
""", marker)


def strays(directory: Path) -> list:
    return [p for p in directory.iterdir() if p.name.startswith(".step")]


def test_writer_killed_mid_write_leaves_the_last_good_checkpoint(tmp_path):
    """A real process is SIGKILLed after writing the new file's bytes, before the rename."""
    path, marker = tmp_path / checkpoint_name(1), tmp_path / "writing"
    atomic_save(good_state(1), path)
    kill(stalled_writer(path, marker))
    assert len(strays(tmp_path)) == 1 and strays(tmp_path)[0].stat().st_size > 0  # the half-done write
    assert load_checkpoint(path)["step"] == 1
    assert checkpoint_paths(tmp_path) == [path]
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, marker.name])


def test_another_live_job_keeps_its_directory_and_its_temporary_file(tmp_path):
    """Another job (a real process) holds ``ckpt`` and is writing into ``shared`` (stalled before its rename).
    This process is refused ``ckpt`` with the directory and the holder's pid; pruning ``shared`` spares the live
    writer's temporary file (it used to be deleted, failing that writer with FileNotFoundError).  Once the other
    job is killed, the kernel drops its lock and its temporary file is a stray that prune removes."""
    shared, held = tmp_path / "shared", tmp_path / "ckpt"
    shared.mkdir()
    atomic_save(good_state(1), shared / checkpoint_name(1))
    other = stalled_writer(shared / checkpoint_name(2), tmp_path / "writing", lock=held)
    try:
        with pytest.raises(CheckpointError, match=rf"checkpoint directory {held} is in use by another job "
                                                  rf"\(pid {other.pid} on "):
            DirectoryLock(held)
        prune(shared, keep_last=1)
        assert len(strays(shared)) == 1, "prune deleted a live writer's temporary file"
    finally:
        kill(other)
    prune(shared, keep_last=1)
    assert strays(shared) == [] and checkpoint_paths(shared) == [shared / checkpoint_name(1)]
    lock = DirectoryLock(held)
    assert lock.held
    lock.release()
    assert not lock.held and checkpoint_paths(held) == []  # the lock file is not a checkpoint


def test_prune_keeps_the_last_k(tmp_path):
    for step in (3, 10, 7, 12):
        atomic_save(good_state(step), tmp_path / checkpoint_name(step))
    prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == [checkpoint_name(10), checkpoint_name(12)]
    assert latest_checkpoint(tmp_path).name == checkpoint_name(12)
    assert latest_checkpoint(tmp_path / "missing") is None


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def damaged(path: Path, how: str) -> None:
    """Writes a damaged or foreign file at ``path`` (see the cases below)."""
    atomic_save(good_state(1), path)
    data = path.read_bytes()
    tensor_at = data.index((torch.arange(1000, dtype=torch.float32) * 1)[500:502].numpy().tobytes())
    path.write_bytes({
        "empty": b"",
        "garbage": b"\x00garbage" * 10,
        "plain torch.save": None,
        "truncated header": data[:HEADER_BYTES - 5],
        "truncated": data[:200],
        "appended": data + b"\n",
        "flipped magic": flip(data, 0),
        "flipped checksum": flip(data, HEADER_BYTES - 1),
        "flipped pickle header": flip(data, HEADER_BYTES + 1),  # the payload's zip header ('PK...')
        "flipped tensor byte": flip(data, tensor_at + 2),
    }[how] or b"")
    if how == "plain torch.save":
        torch.save(good_state(1), path)


@pytest.mark.parametrize("how, message", [
    ("empty", "is not a pytrain checkpoint file .* it is empty"),
    ("garbage", "is not a pytrain checkpoint file"),
    ("plain torch.save", r"is not a pytrain checkpoint file .* a zip archive \(a plain torch.save file\?\)"),
    ("truncated header", "is truncated: 47 bytes, shorter than the 52-byte header"),
    ("truncated", r"is truncated: 148 of \d+ payload bytes"),
    ("appended", "has 1 unexpected bytes after its"),
    ("flipped magic", "is not a pytrain checkpoint file"),
    ("flipped checksum", "is corrupted: the sha256 of its payload is"),
    ("flipped pickle header", "is corrupted: the sha256 of its payload is"),
    ("flipped tensor byte", "is corrupted: the sha256 of its payload is"),
])
def test_damaged_or_foreign_file_is_a_clear_error(tmp_path, how, message):
    path = tmp_path / "c.pt"
    damaged(path, how)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} {message}"):
        load_checkpoint(path)


def test_missing_and_non_dict_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'c.pt'} does not exist"):
        load_checkpoint(tmp_path / "c.pt")
    atomic_save([1, 2], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, mounted for the test and unmounted after it (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_names_the_path_and_enospc(tiny_disk):
    path = tiny_disk / checkpoint_name(1)
    atomic_save(good_state(1), path)  # 4 KB: fits
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint {path}: No space left on device "
                                              rf"\(ENOSPC, errno {errno.ENOSPC}\)"):
        atomic_save({"step": 2, "w": torch.ones(100000)}, path)  # 400 KB: does not
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert os.listdir(tiny_disk) == [path.name]  # and no temporary file is left
