"""Output of the trainers: JSON-lines metrics and a progress bar (no-ops on every rank but 0, so trainers call them
unconditionally), and the run summary ``TrainSummary``.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, fields
from typing import IO, Optional, Tuple

import torch.distributed as dist

from ..cost.report import Record


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
    """A ``tqdm`` bar on rank 0's stderr: steps done / total, elapsed time, ETA, steps per second and a status text.

    Drawn only when the stream is a terminal (logs and CI get nothing; the JSON lines are the record).  ``initial``:
    the step a resumed run starts at (the rate and ETA count only this run's steps).  Without ``tqdm`` installed
    there is no bar (a one-line note says why).
    """

    def __init__(self, total: int, enabled: bool = True, stream: IO[str] = sys.stderr, initial: int = 0):
        self._bar = None
        if not (enabled and is_main_rank() and getattr(stream, "isatty", lambda: False)()):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            stream.write("pytrain: no progress bar (pip install tqdm for one)\n")
            return
        self._bar = tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True, leave=True)

    def update(self, done: int, text: str = "") -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass(frozen=True, eq=False, repr=False)
class TrainSummary(Record):
    """What a trainer's ``fit`` did, as a readable record that also reads like the dict it replaces.

    steps: the global step reached (counted from step 0, a resumed run's earlier steps included); start_step: the
    step this trainer started from (0, or the checkpoint it resumed); steps_run: the steps this trainer trained;
    epochs: position in epochs.  The measurements cover the steps run: first_loss / final_loss (mean over ranks),
    median_step_s, median_opt_s, tokens_per_s; best_val_loss (over the run's evaluations, a resumed best
    included); bytes_sent / bytes_uncompressed (all ranks, with a counting hook).  A measurement the run does not
    have (no step trained, no evaluation, no counting hook) is absent from the mapping, as from the old dict.
    """

    steps: int
    start_step: int
    steps_run: int
    epochs: float
    world_size: int
    stopped_early: bool
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    median_step_s: Optional[float] = None
    median_opt_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    best_val_loss: Optional[float] = None
    bytes_sent: Optional[int] = None
    bytes_uncompressed: Optional[int] = None

    def _names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def __repr__(self) -> str:
        stretch = f"steps {self.start_step + 1}-{self.steps}" if self.steps_run else "no step"
        if self.start_step:
            stretch += f", resumed from step {self.start_step}"
        parts = [f"{self.steps_run} steps ({stretch}) on {self.world_size} ranks"]
        if self.first_loss is not None:
            parts.append(f"loss {self.first_loss:.4g} -> {self.final_loss:.4g}")
        if self.best_val_loss is not None:
            parts.append(f"best val {self.best_val_loss:.4g}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s, step {self.median_step_s * 1e3:.4g} ms")
        if self.bytes_sent is not None:
            parts.append(f"{self.bytes_sent / 1e6:.3g} MB sent of {self.bytes_uncompressed / 1e6:.3g} MB")
        if self.stopped_early:
            parts.append("stopped early")
        return f"TrainSummary({', '.join(parts)})"
