"""Timing one case.  On the CPU: pytest-benchmark's ``benchmark.pedantic`` (warm-up rounds, then timed
rounds; the median is reported), or without pytest-benchmark a perf_counter loop with the same rounds,
so the suites also run where only pytest is.  On a GPU: CUDA events around each round, all rounds
queued back to back and read after one synchronize, so the numbers are GPU time, not launch latency.
Also what the notes name: state bytes and pytrain's backend."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pytrain.ops import NoImplementationError, registry

ROUNDS = {"cpu": (2, 5), "cuda": (10, 50)}  # device -> (warm-up rounds, timed rounds)


@dataclass
class Timing:
    median: float
    min: float
    max: float
    rounds: int


def time_rounds(request, target: Callable[[], None], group: str, warmup: int, rounds: int,
                device: torch.device) -> Optional[Timing]:
    """Median over ``rounds`` after ``warmup``; None when benchmarks are disabled (--benchmark-disable).

    request: the pytest request of the test being measured (its ``benchmark`` fixture, when the
    plugin is loaded).  target: one round, without a synchronize of its own."""
    if request.config.getoption("benchmark_disable", False):
        return None
    if device.type == "cuda":
        return _cuda_event_rounds(target, warmup, rounds, device)
    if request.config.pluginmanager.hasplugin("benchmark"):
        benchmark = request.getfixturevalue("benchmark")
        benchmark.group = group
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if benchmark.disabled:
            return None
        stats = benchmark.stats.stats
        return Timing(stats.median, stats.min, stats.max, stats.rounds)
    for _ in range(warmup):
        target()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        target()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), rounds)


def _cuda_event_rounds(target: Callable[[], None], warmup: int, rounds: int, device: torch.device) -> Timing:
    for _ in range(warmup):
        target()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, end in events:
        start.record()
        target()
        end.record()
    torch.cuda.synchronize(device)
    times = [start.elapsed_time(end) / 1e3 for start, end in events]
    return Timing(statistics.median(times), min(times), max(times), rounds)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's per-param state tensors (moments, codes, scales, masters; not the step count)."""
    return sum(v.nbytes for state in optimizer.state.values() for k, v in state.items()
               if torch.is_tensor(v) and k != "step")


def backend_name(op: str, device: torch.device, impl: Optional[str]) -> str:
    """The backend pytrain picks for fp32 tensors of ``op`` on ``device`` (or the forced ``impl``)."""
    try:
        return registry(op).select(device, torch.float32, impl).name
    except NoImplementationError:
        return f"{impl} (unavailable)"


def peak_rss_above_start(fn: Callable[[], object]) -> int:
    """Bytes of resident memory at the peak of ``fn()`` above the level before it (Linux only: resets VmHWM
    through /proc/self/clear_refs, so callers check that it exists)."""
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = status("VmRSS:")
    fn()
    return status("VmHWM:") - start
