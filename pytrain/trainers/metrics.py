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
    """``[#####.....] 12/100 loss 3.21 ...`` redrawn in place on stderr (rank 0 only)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30, stream: IO[str] = sys.stderr):
        self.total, self.width, self.stream = max(1, total), width, stream
        self.enabled = enabled and is_main_rank()
        self._drawn = False

    def update(self, done: int, text: str = "") -> None:
        if not self.enabled:
            return
        filled = min(self.width, self.width * done // self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {text}\033[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
