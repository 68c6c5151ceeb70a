"""Pipeline parallelism: bubble, in-flight activations, point-to-point bytes, stage balance, step time.

p stages, m micro-batches per step, t_f + t_b the forward + backward time of one micro-batch on a stage:

    GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush; Narayanan et al. 2021) idle the pipeline for p-1
    slots:   bubble / total = (p-1) / (m + p-1)        bubble / ideal = (p-1) / m
    interleaved 1F1B, v model chunks per device (Narayanan et al. 2021, Section 2.2): slots are 1/v as long,
             bubble / ideal = (p-1) / (v m)            bubble / total = (p-1) / (v m + p-1)
    step time ~ (m + (p-1)/v) * max_i(t_f + t_b)_i      (the slowest stage sets the pace)

Activations held at the peak by the first stage, in micro-batches' worth of that stage's layers: GPipe m
(all forwards before any backward), 1F1B min(p, m), interleaved min(p, m) * (1 + (p-1)/(p v))
(Korthikanti et al. 2022, Section 4.2.3).  Between stages each micro-batch sends its activation
``s b h e`` bytes forward and the same-size gradient back.  Load balance = max_i T_i / mean_i T_i.
"""
from __future__ import annotations

from typing import Sequence

from ._checks import count, real

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _check(stages: int, microbatches: int, schedule: str, virtual_stages: int) -> tuple:
    """(stages, microbatches, virtual_stages) as plain ints, after checking them against ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    stages, microbatches, virtual_stages = (count(name, value) for name, value in (
        ("stages", stages), ("microbatches", microbatches), ("virtual_stages", virtual_stages)))
    if schedule != "interleaved" and virtual_stages != 1:
        raise ValueError(f"virtual_stages > 1 needs schedule='interleaved', got {schedule!r}")
    if schedule != "gpipe" and stages > 1 and microbatches < stages:
        raise ValueError(f"{schedule} needs at least as many micro-batches as stages "
                         f"(got {microbatches} micro-batches for {stages} stages)")
    return stages, microbatches, virtual_stages


def bubble_fraction(stages: int, microbatches: int, schedule: str = "gpipe", virtual_stages: int = 1,
                    relative_to: str = "total") -> float:
    """Idle fraction of the pipeline (module docstring): ``relative_to="total"`` the share of the step time,
    ``(p-1)/(v m + p-1)`` (v = 1 for GPipe and 1F1B); ``"ideal"`` bubble time over the bubble-free time,
    ``(p-1)/(v m)`` (Narayanan et al. 2021)."""
    stages, microbatches, virtual_stages = _check(stages, microbatches, schedule, virtual_stages)
    if relative_to not in ("total", "ideal"):
        raise ValueError(f"relative_to must be 'total' or 'ideal', got {relative_to!r}")
    bubble, ideal = stages - 1, virtual_stages * microbatches
    return bubble / ideal if relative_to == "ideal" else bubble / (ideal + bubble)


def inflight_microbatches(stages: int, microbatches: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Micro-batches whose activations the first stage holds at its peak: GPipe m, 1F1B min(p, m),
    interleaved min(p, m) (1 + (p-1)/(p v)) (Korthikanti et al. 2022)."""
    stages, microbatches, virtual_stages = _check(stages, microbatches, schedule, virtual_stages)
    if schedule == "gpipe":
        return float(microbatches)
    held = float(min(stages, microbatches))
    return held * (1 + (stages - 1) / (stages * virtual_stages)) if schedule == "interleaved" else held


def p2p_bytes(seq: int, micro_batch: int, hidden: int, bytes_per_element: int = 2) -> int:
    """Bytes one micro-batch sends across one stage boundary in each direction: ``s b h e``."""
    seq, micro_batch, hidden, bytes_per_element = (count(name, value) for name, value in (
        ("seq", seq), ("micro_batch", micro_batch), ("hidden", hidden), ("bytes_per_element", bytes_per_element)))
    return seq * micro_batch * hidden * bytes_per_element


def load_balance(stage_times: Sequence[float]) -> float:
    """``max_i T_i / mean_i T_i`` of the stages' times (1 = perfectly balanced)."""
    times = [real(f"stage_times[{i}]", t, unit="s") for i, t in enumerate(stage_times)]
    if not sum(times) > 0:
        raise ValueError(f"stage_times must be a non-empty sequence of times >= 0 with a positive sum, got {times!r}")
    return max(times) * len(times) / sum(times)


def pipeline_step(stage_times: Sequence[float], microbatches: int, schedule: str = "1f1b",
                  virtual_stages: int = 1, p2p_s: float = 0.0) -> float:
    """Seconds of one pipeline step: ``(m + (p-1)/v) * (max_i T_i + 2 p2p_s)`` with T_i the forward +
    backward seconds of one micro-batch on stage i (all of its v chunks) and ``p2p_s`` the seconds to
    send one micro-batch's activation (and, backward, its gradient) across a boundary."""
    times = list(stage_times)
    load_balance(times)
    p2p_s = real("p2p_s", p2p_s, unit="s")
    p, microbatches, virtual_stages = _check(len(times), microbatches, schedule, virtual_stages)
    slot = max(times) + (2 * p2p_s if p > 1 else 0.0)
    return (microbatches + (p - 1) / virtual_stages) * slot
