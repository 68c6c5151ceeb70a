"""Rank-0 output of the trainers: JSON-lines metrics and a one-line progress bar.

Both are no-ops on every rank but 0, so trainers call them unconditionally.
"""
from __future__ import annotations

import json
import math
import sys
from typing import IO, Optional

import torch.distributed as dist


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _plain(value):
    """JSON-friendly scalars: floats rounded to 6 significant digits, NaN/Inf as strings."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    return value


class JsonLogger:
    """Appends one JSON object per ``log(**record)`` call to ``path`` (rank 0 only; None: off)."""

    def __init__(self, path: Optional[str], append: bool = False):
        self._file: Optional[IO[str]] = None
        if path is not None and is_main_rank():
            self._file = open(path, "a" if append else "w", encoding="utf-8")

    def log(self, **record) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ProgressBar:
    """``[#####.....] 12/100 loss 3.21 ...`` redrawn in place on stderr (rank 0 only).

    When the stream is not a terminal (a log file, CI), the bar is written as a plain line
    at every tenth of the run instead, so logs stay readable.
    """

    def __init__(self, total: int, enabled: bool = True, width: int = 30, stream: IO[str] = sys.stderr):
        self.total, self.width, self.stream = max(1, total), width, stream
        self.enabled = enabled and is_main_rank()
        self._drawn = False
        self._interactive = getattr(stream, "isatty", lambda: False)()
        self._every = max(1, self.total // 10)

    def update(self, done: int, text: str = "") -> None:
        if not self.enabled:
            return
        filled = min(self.width, self.width * done // self.total)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {text}"
        if self._interactive:
            self.stream.write(f"\r{line}\033[K")
            self._drawn = True
        elif done % self._every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
