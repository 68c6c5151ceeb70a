"""Where a run's records go besides the JSON lines: TensorBoard event files, and reading a run back.

A trainer's record (one per step, one per evaluation, see ``DDPTrainer``) becomes TensorBoard scalars through
``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package: ``pip install pytrain[track]``),
under the tags of ``TAGS``:

=====================  =========================  ==========================================================
record key             tag                        meaning
=====================  =========================  ==========================================================
loss                   train/loss                 mean training loss of the step over ranks
val_loss               val/loss                   validation loss
lr                     train/lr                   learning rate of the step (param group 0)
grad_norm              train/grad_norm            global gradient norm before clipping
skipped                train/skipped_steps        steps skipped so far (Inf/NaN gradients)
tokens_per_s           perf/tokens_per_s          throughput of the step
step_s                 perf/step_s                measured step time
predicted_step_s       perf/predicted_step_s      the cost model's step time (``pytrain train`` logs it at the end)
opt_s                  perf/optimizer_s           optimizer step time
bytes_sent             comm/bytes_sent            bytes this rank's hook sent so far
bytes_uncompressed     comm/bytes_uncompressed    bytes an uncompressed all-reduce would have sent so far
peak_mem_bytes         memory/peak_bytes          peak memory of the process (CUDA allocator, or max RSS on CPU)
=====================  =========================  ==========================================================

Other numeric keys go under ``run/<key>``; a ``note`` becomes text.  ``read_run`` reads a run back, from a
TensorBoard directory (TensorBoard's ``EventAccumulator``) or a JSON-lines log, as tag -> (steps, values).
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .metrics import is_main_rank

TAGS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "skipped": "train/skipped_steps", "tokens_per_s": "perf/tokens_per_s", "step_s": "perf/step_s",
        "predicted_step_s": "perf/predicted_step_s", "opt_s": "perf/optimizer_s", "bytes_sent": "comm/bytes_sent",
        "bytes_uncompressed": "comm/bytes_uncompressed", "peak_mem_bytes": "memory/peak_bytes"}
NOT_SCALARS = ("step", "epoch", "note", "samples_per_s")
Series = Dict[str, Tuple[List[int], List[float]]]


def missing(package: str, extra: str, what: str) -> RuntimeError:
    """The error for an optional dependency that is not installed."""
    return RuntimeError(f"{what} needs the {package!r} package, which is not installed: pip install {package} "
                        f"(or pip install pytrain[{extra}])")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA caching allocator's peak on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


class TensorBoardLog:
    """Writes each ``log(**record)`` as TensorBoard scalars at the record's ``step`` (rank 0 only; None: off)."""

    def __init__(self, log_dir: Optional[str]):
        self._writer = None
        self._skipped = 0
        if log_dir is None or not is_main_rank():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise missing("tensorboard", "track", "--tensorboard (TensorBoard event files)") from exc
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, **record) -> None:
        if self._writer is None or "step" not in record:
            return
        step = int(record["step"])
        if record.get("skipped"):
            self._skipped += 1
        if "loss" in record:  # a step record: its skipped count, 0 included, so the curve starts at the first step
            self._writer.add_scalar(TAGS["skipped"], self._skipped, step)
        for key, value in record.items():
            if key in NOT_SCALARS or key == "skipped" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self._writer.add_scalar(TAGS.get(key, f"run/{key}"), value, step)
        if "note" in record:
            self._writer.add_text("notes", str(record["note"]), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RunLog:
    """Sends every record to each of its sinks (``JsonLogger``, ``TensorBoardLog``)."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def log(self, **record) -> None:
        for sink in self.sinks:
            sink.log(**record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _read_tensorboard(path: Path) -> Series:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise missing("tensorboard", "track", f"reading TensorBoard events ({path})") from exc
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def _read_json_lines(path: Path) -> Series:
    out: Series = {}
    skipped = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "loss" in record:
            skipped += bool(record.get("skipped"))
            record["skipped"] = skipped
        for key, value in record.items():
            if isinstance(value, str) and value in ("nan", "inf", "-inf"):
                value = float(value)
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(TAGS.get(key, f"run/{key}"), ([], []))
            steps.append(int(record["step"]))
            values.append(float(value))
    return out


def read_run(path) -> Series:
    """A run's scalars, tag -> (steps, values): from a TensorBoard log directory or a JSON-lines log file."""
    path = Path(path)
    if path.is_dir():
        if not any(name.startswith("events.out.tfevents") for _, _, names in os.walk(path) for name in names):
            raise ValueError(f"{path}: no TensorBoard event files in this directory")
        return _read_tensorboard(path)
    if path.is_file():
        return _read_json_lines(path)
    raise FileNotFoundError(f"{path}: no such run (expected a TensorBoard directory or a JSON-lines log file)")

