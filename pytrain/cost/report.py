"""Small result records with readable reprs that still read like the dicts they replace.

A ``Record`` is a frozen dataclass that is also a read-only ``Mapping`` of its fields, so code written
against the old dict results keeps working (``report["measured"]``, ``dict(report)``, ``report == {...}``)
while ``report.measured`` and ``print(report)`` are what new code and people use.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Iterator, Tuple


class Record(Mapping):
    """Mixin for a ``@dataclass(frozen=True, eq=False, repr=False)``: a read-only mapping of its fields
    (equality is the mapping's: equal to a dict or record with the same keys and values)."""

    __slots__ = ()

    def __getitem__(self, key: str):
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(self))


@dataclass(frozen=True, eq=False, repr=False)
class BubbleReport(Record):
    """A pipeline's measured idle fraction and step time next to the cost model's (``PipelineTrainer.bubble_report``).

    measured / predicted: bubble as a share of the step (mean over the pipeline's ranks / ``bubble_fraction``);
    per_rank: each rank's measured idle share; imbalance: max / mean of the ranks' compute; step_s /
    predicted_step_s: mean wall seconds of a schedule step / ``pipeline_step`` of the measured compute."""

    schedule: str
    stages: int
    virtual_stages: int
    microbatches: int
    measured: float
    predicted: float
    per_rank: list
    imbalance: float
    step_s: float
    predicted_step_s: float

    def __repr__(self) -> str:
        chunks = f" x {self.virtual_stages} chunks" if self.virtual_stages > 1 else ""
        return (f"BubbleReport({self.schedule}, {self.stages} stages{chunks}, {self.microbatches} micro-batches: "
                f"bubble {self.measured:.1%} measured vs {self.predicted:.1%} predicted, step "
                f"{self.step_s * 1e3:.4g} ms vs {self.predicted_step_s * 1e3:.4g} ms predicted, "
                f"imbalance {self.imbalance:.2f})")
