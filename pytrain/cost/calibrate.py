"""Calibrate the alpha-beta link on a real ``torch.distributed`` group: time collectives, fit alpha and beta.

Timing (the nccl-tests recipe, adapted to noisy shared CPUs): warm-up rounds first, then ``repeats``
rounds; each round runs one collective per message size, the sizes interleaved so that slow drifts of the
machine's load hit every size alike, in a fresh order each round (seeded by the round, the same on every
rank) so that no size always follows the largest.  Every collective is timed on its own
(``time.perf_counter`` around the blocking call), after one untimed call of the same size that absorbs
the ranks' skew left by the previous size (without it, a small message timed after a large one also
measures the other rank finishing the large one); a size's time is the median of its samples on each
rank, then the maximum over ranks (the collective ends when its slowest rank does), agreed through one
all-reduce so that every rank returns the same fit.

Fit: the model is linear in (alpha, beta): ``t(n) = a(p) alpha + b(p) beta n`` (see ``collectives``), so
alpha and beta come from a straight line through the per-size medians, weighted by ``1 / t^2`` (relative
error: sizes span decades of time) and made robust with Huber's loss by iteratively reweighted least squares
(Huber 1964; scale from the median absolute deviation).  A negative fitted intercept or slope is clamped to 0
and the other coefficient refitted alone.

Host work: the same timed calls also read the process's CPU time (``time.process_time``: every thread, user
and kernel), and the slope of its per-size medians against the bytes each rank sends (``bytes_sent``) is
``host_s_per_byte``, the rank's own compute spent per byte on the wire (TCP stack, copies, the reduction).
Where the link is slower than the host (a real network) it is a small part of beta; on loopback or a fast
link driven by CPUs it is all of it, and it cannot overlap with a backward pass on the same cores
(``pytrain.cost.ddp``).
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._checks import count, real
from .collectives import COLLECTIVES, Link, bytes_sent, coefficients

DEFAULT_SIZES = (16 * 2**10, 512 * 2**10, 8 * 2**20)  # bytes: latency-, mixed- and bandwidth-dominated
HUBER_K = 1.345  # Huber's constant: 95% efficiency for Gaussian residuals


@dataclass(repr=False)
class Calibration:
    """A fitted link.  ``link``: alpha (s), beta (s/byte); ``op`` and ``world_size`` it was measured with;
    ``measured``: {n_bytes: median seconds} that the fit used; ``validation``: {n_bytes: median seconds} of
    held-out sizes timed in the same interleaved rounds but not fitted; ``host_s_per_byte``: CPU seconds of a
    rank per byte it sends (module docstring; 0 when not measured)."""

    link: Link
    op: str
    world_size: int
    measured: Dict[int, float] = field(default_factory=dict)
    validation: Dict[int, float] = field(default_factory=dict)
    host_s_per_byte: float = 0.0

    def predict(self, n_bytes: float, op: Optional[str] = None) -> float:
        """Predicted seconds of collective ``op`` (default: the calibrated one) on ``n_bytes``."""
        return COLLECTIVES[op or self.op](n_bytes, self.world_size, self.link)

    def relative_errors(self, held_out: bool = False) -> Dict[int, float]:
        """(predicted - measured) / measured at each calibration size (``held_out``: each validation size)."""
        return {n: self.predict(n) / t - 1 for n, t in (self.validation if held_out else self.measured).items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n / 2**20:.3g}" for n in sorted(self.measured))
        held = f"; {len(self.validation)} held-out sizes" if self.validation else ""
        return f"Calibration({self.op} on {self.world_size} ranks: {self.link}; fitted on {sizes} MiB{held})"


def _collective(op: str, n_bytes: int, p: int, group, dtype: torch.dtype) -> Callable[[], None]:
    """A closure running ``op`` once on buffers of ``dtype`` of about ``n_bytes`` (rounded to p elements)."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
    numel = max(p, -(-n_bytes // (size * p)) * p)
    buf = torch.ones(numel, dtype=dtype)
    if op == "all_reduce":
        return lambda: dist.all_reduce(buf, group=group)
    if op == "reduce_scatter":  # *_single: torch >= 2.14 names; *_tensor before
        out = torch.empty(numel // p, dtype=dtype)
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: reduce_scatter(out, buf, group=group)
    if op == "all_gather":
        shard = torch.ones(numel // p, dtype=dtype)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: all_gather(buf, shard, group=group)
    if op == "all_to_all":
        out = torch.empty(numel, dtype=dtype)
        return lambda: dist.all_to_all_single(out, buf, group=group)
    raise ValueError(f"unknown collective {op!r}; one of {sorted(COLLECTIVES)}")


def measure_collective(sizes: Sequence[int], group=None, *, repeats: int = 20, warmup: int = 3,
                       op: str = "all_reduce", dtype: torch.dtype = torch.float32) -> List[float]:
    """Median seconds of ``op`` for each message size in ``sizes`` (bytes) on ``group`` (default: WORLD),
    the same on every rank (max over ranks of each rank's median).  ``dtype``: the elements sent (the
    reduction's arithmetic, e.g. fp16 on a CPU, costs per byte too).  Every rank of the group must call it."""
    return _measure(sizes, group, repeats, warmup, op, dtype)[0]


def _measure(sizes: Sequence[int], group, repeats: int, warmup: int, op: str,
             dtype: torch.dtype) -> Tuple[List[float], List[float]]:
    """``measure_collective``'s medians, and those of the process CPU seconds of the same calls (max over ranks)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("measure_collective needs an initialized torch.distributed process group")
    if not sizes:
        raise ValueError(f"sizes must be a non-empty sequence of positive ints (bytes), got {sizes!r}")
    sizes = [count(f"sizes[{i}] (bytes)", n) for i, n in enumerate(sizes)]
    repeats, warmup = count("repeats", repeats), count("warmup", warmup, 0)
    p = dist.get_world_size(group)
    runs = [_collective(op, n, p, group, dtype) for n in sizes]
    samples: List[List[float]] = [[] for _ in sizes]
    cpu: List[List[float]] = [[] for _ in sizes]
    for round_ in range(warmup + repeats):
        order = random.Random(round_).sample(range(len(sizes)), len(sizes))  # the same on every rank
        for i in order:
            runs[i]()  # re-aligns the ranks: its time holds the skew of the previous size
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[i]()
            if round_ >= warmup:
                samples[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
    medians = torch.tensor([[statistics.median(t) for t in samples], [statistics.median(t) for t in cpu]],
                           dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=group)
    return medians[0].tolist(), medians[1].tolist()


def _weighted_line(x: Sequence[float], y: Sequence[float], w: Sequence[float]) -> Tuple[float, float]:
    """Weighted least-squares line ``y = c0 + c1 x``; a negative coefficient is clamped to 0, the other refitted."""
    sw = sum(w)
    sx = sum(wi * xi for wi, xi in zip(w, x))
    sy = sum(wi * yi for wi, yi in zip(w, y))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, x))
    sxy = sum(wi * xi * yi for wi, xi, yi in zip(w, x, y))
    det = sw * sxx - sx * sx
    c0, c1 = ((sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det) if det > 0 else (-1.0, -1.0)
    if c0 < 0 or det <= 0:
        c0, c1 = 0.0, max(sxy / sxx, 0.0) if sxx > 0 else 0.0
    if c1 < 0:
        c0, c1 = max(sy / sw, 0.0), 0.0
    return c0, c1


def fit_line(x: Sequence[float], y: Sequence[float], iterations: int = 20) -> Tuple[float, float]:
    """Robust fit of ``y = c0 + c1 x`` (c0, c1 >= 0) minimising Huber's loss of the relative residuals
    ``(y - c0 - c1 x) / y`` by iteratively reweighted least squares."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least 2 (x, y) points of equal count, got {len(x)} and {len(y)}")
    if len(set(x)) < 2:
        raise ValueError("need at least 2 distinct message sizes to fit alpha and beta")
    if any(not yi > 0 for yi in y):
        raise ValueError(f"measured times must be > 0, got {list(y)}")
    base = [1.0 / (yi * yi) for yi in y]
    c0, c1 = _weighted_line(x, y, base)
    for _ in range(iterations):
        r = [(yi - c0 - c1 * xi) / yi for xi, yi in zip(x, y)]
        scale = 1.4826 * statistics.median(abs(ri) for ri in r) or 1e-12
        robust = [1.0 if abs(ri) <= HUBER_K * scale else HUBER_K * scale / abs(ri) for ri in r]
        c0, c1 = _weighted_line(x, y, [b * h for b, h in zip(base, robust)])
    return c0, c1


def fit_link(sizes: Sequence[int], seconds: Sequence[float], p: int, op: str = "all_reduce") -> Calibration:
    """Fit alpha, beta of ``op`` on ``p`` ranks to measured (bytes, seconds) pairs: ``t = a(p) alpha + b(p) beta n``."""
    if count("p", p) < 2:
        raise ValueError(f"calibration needs a group of >= 2 ranks (one rank communicates nothing), got {p}")
    a, b = coefficients(op, p)
    x = [real(f"sizes[{i}]", n, strict=True, unit="bytes") for i, n in enumerate(sizes)]
    c0, c1 = fit_line(x, [real(f"seconds[{i}]", t, strict=True, unit="s") for i, t in enumerate(seconds)])
    return Calibration(Link(c0 / a, c1 / b), op, p, dict(zip(sizes, seconds)))


def calibrate(group=None, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 20, op: str = "all_reduce",
              warmup: int = 3, validate_sizes: Sequence[int] = (), dtype: torch.dtype = torch.float32) -> Calibration:
    """Time ``op`` on ``group`` (default: WORLD) at each of ``sizes`` bytes and fit the alpha-beta link.

    ``validate_sizes``: more sizes timed in the same interleaved rounds (so a change of the machine's load
    hits them and the fitted sizes alike) and kept out of the fit, to check its predictions
    (``relative_errors(held_out=True)``).  Collective: every rank of the group must call it; all get the
    same ``Calibration``.  ``dtype``: the element type on the wire (see ``measure_collective``)."""
    if op not in COLLECTIVES:
        raise ValueError(f"unknown collective {op!r}; one of {sorted(COLLECTIVES)}")
    if len(set(sizes)) < 2:
        raise ValueError(f"calibrate needs at least 2 distinct message sizes, got {sizes!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("calibrate needs an initialized torch.distributed process group")
    p = dist.get_world_size(group)
    if p < 2:
        raise ValueError(f"calibration needs a group of >= 2 ranks (one rank communicates nothing), got {p}")
    every = list(sizes) + [n for n in validate_sizes if n not in sizes]
    wall, cpu = _measure(every, group, repeats, warmup, op, dtype)
    seconds = dict(zip(every, wall))
    cal = fit_link(list(sizes), [seconds[n] for n in sizes], p, op)
    cal.validation = {n: seconds[n] for n in every[len(sizes):]}
    sent = [bytes_sent(op, n, p) for n in every]
    if len(set(sent)) >= 2 and all(t > 0 for t in cpu):
        cal.host_s_per_byte = fit_line(sent, cpu)[1]
    return cal
