"""Checkpoint files: atomic, checksummed writes; the last K kept; one job per directory; clear errors on load.

File layout (``FORMAT_VERSION`` 1)::

    MAGIC (12 bytes, b"PYTRAINCKPT\\n") | payload length (8 bytes, little-endian) | sha256(payload) (32 bytes) | payload

where the payload is ``torch.save(obj)``.  ``load_checkpoint`` checks the magic (a foreign file, or a plain
``torch.save`` file, is refused), the length (a truncated file, or one with bytes appended), and the sha256 of
the payload (any flipped byte, in tensor data or in the pickle) before unpickling it with
``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only: no code runs).

A checkpoint is serialised in memory, written to a temporary file in the destination's directory, flushed and
``fsync``-ed, then moved over the destination with ``os.replace`` (atomic on POSIX) and the directory entry
``fsync``-ed.  A crash at any moment therefore leaves either the previous file or the complete new one under the
final name, never a truncated one; a killed writer can only leave a stray ``.<name>.tmp-<pid>@<host>-*`` file,
which ``checkpoint_paths`` ignores and ``prune`` removes once its writer is no longer running.

One job per directory: ``DirectoryLock`` holds an ``fcntl.flock`` on ``<directory>/.pytrain.lock`` (released by
the kernel when the holder exits, however it exits); a second job gets a ``CheckpointError`` naming the
directory and the pid and host holding it.  Files in a checkpoint directory are named
``step-<global step, 8 digits>.pt``.

Every failure, reading or writing, is a ``CheckpointError`` naming the file and the cause (for a full disk: the
path, ``ENOSPC`` and the errno).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
CHECKPOINT_RE = re.compile(r"^step-(\d{8})(\.pt|\.dcp)$")  # files; sharded: directories
MAGIC = b"PYTRAINCKPT\n"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<Q")
HEADER_BYTES = len(MAGIC) + _LENGTH.size + hashlib.sha256().digest_size
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)@(?P<host>.+)-[a-z0-9_]+$")
LOCK_NAME = ".pytrain.lock"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, or does not fit what it is loaded into."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _os_error(action: str, path: Path, exc: OSError) -> CheckpointError:
    code = errno.errorcode.get(exc.errno, "?") if exc.errno is not None else "?"
    return CheckpointError(f"cannot {action} checkpoint {path}: {exc.strerror or exc} "
                           f"({code}, errno {exc.errno})")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(obj: Any) -> bytes:
    """The bytes of a checkpoint file holding ``obj`` (header + ``torch.save`` payload)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return MAGIC + _LENGTH.pack(len(payload)) + hashlib.sha256(payload).digest() + payload


def atomic_save(obj: Any, path: PathLike) -> None:
    """Writes ``obj`` as a checksummed checkpoint file that never appears partially under ``path``.

    If serialising or writing fails, ``path`` keeps whatever it held before (or stays absent), the temporary
    file is removed and a ``CheckpointError`` names the path and the cause (the errno for an ``OSError``).
    """
    path = Path(path)
    try:
        data = encode(obj)
    except Exception as exc:
        raise CheckpointError(f"cannot serialise checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}@{_host()}-", dir=path.parent)
    except OSError as exc:
        raise _os_error("create a temporary file for", path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _os_error("write", path, exc) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: PathLike) -> None:
    """Removes a file, or a directory tree (a sharded checkpoint); gone already is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def decode(data: bytes, source: str) -> dict:
    """The dict a checkpoint file's bytes hold; ``CheckpointError`` naming ``source`` if they are not one."""
    if len(data) < len(MAGIC) or not data.startswith(MAGIC):
        kind = "it is a zip archive (a plain torch.save file?)" if data[:2] == b"PK" else \
            "it is empty" if not data else f"it starts with {data[:16]!r}"
        raise CheckpointError(f"checkpoint {source} is not a pytrain checkpoint file (no {MAGIC!r} header; {kind})")
    if len(data) < HEADER_BYTES:
        raise CheckpointError(f"checkpoint {source} is truncated: {len(data)} bytes, shorter than the "
                              f"{HEADER_BYTES}-byte header")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    digest = data[len(MAGIC) + _LENGTH.size:HEADER_BYTES]
    payload = memoryview(data)[HEADER_BYTES:]
    if len(payload) < length:
        raise CheckpointError(f"checkpoint {source} is truncated: {len(payload)} of {length} payload bytes")
    if len(payload) > length:
        raise CheckpointError(f"checkpoint {source} has {len(payload) - length} unexpected bytes after its "
                              f"{length}-byte payload")
    found = hashlib.sha256(payload).digest()
    if found != digest:
        raise CheckpointError(f"checkpoint {source} is corrupted: the sha256 of its payload is {found.hex()[:16]}..., "
                              f"the header records {digest.hex()[:16]}...")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum held: a payload written by something other than pytrain
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(f"checkpoint {source} is unreadable ({type(exc).__name__}: {detail})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_checkpoint(path: PathLike) -> dict:
    """Reads a checkpoint written by ``atomic_save``, verifying its header and checksum (see the module doc).

    Raises ``CheckpointError`` naming the file and the reason when it is missing, unreadable, foreign,
    truncated, corrupted or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _os_error("read", path, exc) from exc
    return decode(data, str(path))


def checkpoint_name(step: int, suffix: str = ".pt") -> str:
    """``step-<step>.pt`` (``suffix=".dcp"``: a sharded checkpoint's directory)."""
    return f"step-{step:08d}{suffix}"


def checkpoint_paths(directory: PathLike, suffix: str = ".pt") -> List[Path]:
    """The checkpoints named ``step-*<suffix>`` in ``directory``, oldest (lowest step) first; temporary and lock
    files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and m[2] == suffix)


def latest_checkpoint(directory: PathLike, suffix: str = ".pt") -> Optional[Path]:
    paths = checkpoint_paths(directory, suffix)
    return paths[-1] if paths else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stray_temp_files(directory: PathLike) -> List[Path]:
    """Temporary files in ``directory`` left by writers on this host that are no longer running."""
    host, strays = _host(), []
    for p in Path(directory).iterdir():
        m = TEMP_RE.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_running(int(m["pid"])):
            strays.append(p)
    return strays


def prune(directory: PathLike, keep_last: int, suffix: str = ".pt") -> None:
    """Deletes all but the newest ``keep_last`` checkpoints named ``*<suffix>``, and temporary files (or directories)
    whose writer (a process on this host) has died; another live writer's in-flight temporary file is never touched.

    Call it only from the process that holds the directory's ``DirectoryLock``."""
    directory = Path(directory)
    paths = checkpoint_paths(directory, suffix)
    for old in paths[:max(0, len(paths) - keep_last)] + stray_temp_files(directory):
        _unlink_quietly(old)


class DirectoryLock:
    """Exclusive ownership of a checkpoint directory by one process (``fcntl.flock`` on ``.pytrain.lock``).

    ``DirectoryLock(directory)`` creates the directory if needed and takes the lock, or raises
    ``CheckpointError`` naming the directory and the holder (pid and host, as the holder wrote them).  The lock
    lasts until ``release()`` or until the process exits (the kernel drops it, whatever the exit).
    """

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error("lock the directory of", self.path, exc) from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(self._fd)
            self._fd = None
            raise CheckpointError(f"checkpoint directory {self.directory} is in use by another job ({holder} holds "
                                  f"{self.path}); give each job its own checkpoint directory") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drops the lock (idempotent).  The lock file stays (deleting it would race with a new holder); its pid
        line is stale until the next holder rewrites it."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()
