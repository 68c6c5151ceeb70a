"""Results: one Row per measurement, and the one table they make (terminal, markdown, CSV).

Columns: case | torch ms | pytrain ms | ratio | pytrain rate | fraction of the measured ceiling |
notes.  The "torch" column is the baseline each case names in its notes (torch.optim, timm's
pure-PyTorch optimizers, torch ops); other providers (forced backends, FusedAdamW next to LAMB)
appear in the notes.
"""
from __future__ import annotations

import csv
import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .ceilings import CEILING_FORMATS

BASE_PROVIDERS = ("torch", "pytrain")  # the table's two timed columns


@dataclass
class Row:
    """One measurement: a provider's optimizer step on one case of one suite."""

    suite: str
    case: str
    provider: str
    runs: str  # what ran: the baseline's name, or pytrain's backend
    median_s: float
    min_s: float
    max_s: float
    rounds: int
    bytes_moved: float  # the case's byte model (the bytes pytrain's algorithm must move)
    flops: float
    state_bytes: Optional[int]
    target: str
    ceiling: str = "copy_GBps"  # the measured ceiling this case is set against (compute-bound: a matmul)

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.median_s / 1e9

    def throughput(self, ceilings: Dict[str, float]) -> Tuple[str, str]:
        """(rate, % of its ceiling): GB/s against the copy ceiling, or GFLOP/s against a matmul ceiling."""
        if self.ceiling == "wire":  # multi-process cases (bench_hooks): bytes_moved = bytes on the wire per step
            return f"{self.bytes_moved / 1e6:.3g} MB/step on the wire", "-"
        if self.ceiling == "copy_GBps":  # memory-bound: the better of the copy and in-place update bandwidths
            rate, unit = self.gbps, "GB/s"
            ceiling = max(ceilings.get("copy_GBps", 0.0), ceilings.get("update_GBps", 0.0)) or None
        else:
            rate, unit = self.flops / self.median_s / 1e9, "GFLOP/s"
            ceiling = ceilings[self.ceiling] * 1e3 if self.ceiling in ceilings else None
        name = "memory" if self.ceiling == "copy_GBps" else self.ceiling
        return f"{rate:.1f} {unit}", f"{100 * rate / ceiling:.0f}% of {name}" if ceiling else "-"


@dataclass
class Results:
    device: str
    rows: List[Row] = field(default_factory=list)
    ceilings: Dict[str, Dict[str, float]] = field(default_factory=dict)
    param_set: str = ""
    load_at_start: float = 0.0  # 1-minute load average before the suite: other work skews the numbers
    memory: List[str] = field(default_factory=list)  # peak-memory lines (bench_attention), shown under the table

    def cases(self) -> Dict[Tuple[str, str], Dict[str, Row]]:
        out: Dict[Tuple[str, str], Dict[str, Row]] = {}
        for row in self.rows:
            out.setdefault((row.suite, row.case), {})[row.provider] = row
        return out

    def table(self) -> List[List[str]]:
        ceilings = self.ceilings.get(self.device, {})
        lines = [["case", "torch ms", "pytrain ms", "ratio (pytrain/torch)", "pytrain rate", "of measured ceiling",
                  "notes"]]
        for (_, case), by_provider in self.cases().items():
            base, ours = by_provider.get("torch"), by_provider.get("pytrain")
            rate, fraction = ours.throughput(ceilings) if ours else ("-", "-")
            lines.append([
                case, _ms(base), _ms(ours),
                f"{ours.median_s / base.median_s:.2f}x" if base and ours else "-",
                rate, fraction, _notes(by_provider),
            ])
        return lines

    def markdown(self, machine: Dict[str, str]) -> str:
        table = self.table()
        ceil = "; ".join(f"{dev}: " + ", ".join(CEILING_FORMATS[k].format(v) for k, v in c.items())
                         for dev, c in self.ceilings.items())
        head = [
            f"## pytrain benchmarks, {machine['date']} (commit {machine['commit']})",
            "",
            f"device **{self.device}**: {machine['gpu'] + '; host ' if machine['gpu'] else ''}{machine['cpu_model']} "
            f"(flags: {machine['cpu_flags']}), {machine['cores']} cores ({machine['threads']} torch threads, "
            f"load {machine['load_at_start']} at start); "
            f"torch {machine['torch']} (CUDA {machine['cuda']}), triton {machine['triton']}, "
            f"Python {machine['python']}",
            "",
            f"measured ceilings: {ceil}",
            "",
            (f"param set: {self.param_set}; " if self.param_set else "")
            + "times are medians; GB/s = the case's byte model (see each bench file) / pytrain's median; "
            "GFLOP/s = the case's FLOP count / pytrain's median",
            "",
        ]
        rows = ["| " + " | ".join(r) + " |" for r in table]
        rows.insert(1, "|" + "|".join("---" for _ in table[0]) + "|")
        memory = ["", "peak memory:", ""] + [f"- {line}" for line in self.memory] if self.memory else []
        return "\n".join(head + rows + memory) + "\n"

    def append_csv(self, path: Path, machine: Dict[str, str]) -> None:
        ceil = {f"{dev}_{k}": f"{v:.4g}" for dev, c in self.ceilings.items() for k, v in c.items()}
        ceil_keys = [f"{dev}_{k}" for dev in ("cpu", "cuda") for k in CEILING_FORMATS]
        records = [{**machine, **{k: ceil.get(k, "") for k in ceil_keys}, "device": self.device,
                    "param_set": self.param_set, **_rounded(asdict(row)), "GBps": f"{row.gbps:.4g}"}
                   for row in self.rows]
        fields = list(records[0])
        if path.exists() and path.read_text().partition("\n")[0] != ",".join(fields):
            path.rename(path.with_name(f"results-until-{datetime.date.today()}.csv"))  # columns changed
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(records)


def _rounded(record: dict) -> dict:
    return {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in record.items()}


def _ms(row: Optional[Row]) -> str:
    return f"{row.median_s * 1e3:.4g}" if row else "-"


def _notes(by_provider: Dict[str, Row]) -> str:
    """What each column ran, the other providers' times, state bytes and the case's target."""
    base, ours = by_provider.get("torch"), by_provider.get("pytrain")
    notes = []
    if base:
        notes.append(f"torch = {base.runs}")
    if ours:
        notes.append(f"pytrain backend {ours.runs}")
    for name, row in by_provider.items():
        if name not in BASE_PROVIDERS:
            ratio = f", pytrain/{name} = {ours.median_s / row.median_s:.2f}x" if ours else ""
            notes.append(f"{name} [{row.runs}] {_ms(row)} ms{ratio}")
    if ours and ours.state_bytes is not None:
        state = f"state {ours.state_bytes / 2**20:.0f} MiB"
        if base and base.state_bytes:
            state += f" vs {base.state_bytes / 2**20:.0f} MiB ({ours.state_bytes / base.state_bytes:.2f}x)"
        notes.append(state)
    target = next((row.target for row in by_provider.values() if row.target), "")
    if target:
        notes.append(f"target: {target}")
    return "; ".join(notes)
