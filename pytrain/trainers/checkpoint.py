"""Checkpoint files: atomic writes, the last K kept, clear errors on load.

A checkpoint is written to a temporary file in the destination's directory, flushed
and ``fsync``-ed, then moved over the destination with ``os.replace`` (atomic on
POSIX) and the directory entry ``fsync``-ed.  A crash at any moment therefore leaves
either the previous file or the complete new one under the final name, never a
truncated one; a killed writer can only leave a stray ``.<name>.tmp-*`` file, which
``checkpoint_paths`` ignores and ``prune`` removes.

Files in a checkpoint directory are named ``step-<global step, 8 digits>.pt``.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
CHECKPOINT_RE = re.compile(r"^step-(\d{8})\.pt$")
TEMP_PREFIX = "."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit what it is loaded into."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``.

    If serialising or writing fails, ``path`` keeps whatever it held before (or stays
    absent), the temporary file is removed and the error propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: PathLike) -> dict:
    """Reads a checkpoint written by ``atomic_save`` (tensors, numbers, strings, containers only).

    Raises ``CheckpointError`` naming the file and the reason when it is missing,
    unreadable or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def checkpoint_paths(directory: PathLike) -> List[Path]:
    """The checkpoints in ``directory``, oldest (lowest step) first; temporary files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name))


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    paths = checkpoint_paths(directory)
    return paths[-1] if paths else None


def prune(directory: PathLike, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints, and temporary files left by killed writers.

    Only call this from the single process that writes to ``directory``.
    """
    directory = Path(directory)
    paths = checkpoint_paths(directory)
    for old in paths[:max(0, len(paths) - keep_last)]:
        old.unlink()
    for stray in directory.glob(f"{TEMP_PREFIX}step-*.pt.tmp-*"):
        stray.unlink()
