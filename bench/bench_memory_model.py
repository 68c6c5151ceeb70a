"""The memory model (pytrain.cost.memory) against real training steps, per rank: DDP, FSDP2 (ZeRO-3), TP, DP x TP.

    python bench/bench_memory_model.py --out bench/results/<date>-memory-model-cpu.md

On 2 and 4 gloo processes (``pytrain.trainers.spawn``), a GPT of ``pytrain.train`` (2 x 256, 4 heads, seq 256,
vocab 64, 4 sequences per rank, fp32, flash attention; 1.65M params) is wrapped as ``pytrain train`` wraps it
(DDP; ``--shard fsdp``; ``--shard fsdp --tp 2``), stepped three times with FusedAdamW (the third measured),
and each rank reads its own bytes (``pytrain.testing.memory_model``: parameters, gradients, DDP's buckets,
optimizer state after the step, activations left by the forward, the activation peak of forward + backward).
Three runs per layout cover the optimizer state dtypes fp32 / bf16 / int8 and activation checkpointing off /
on: fp32 without, bf16 with, int8 without.  The prediction of each quantity is ``pytrain.testing.memory_model
.predict`` (``memory_per_device`` and ``activation_memory`` on the model's shapes).  A row is within the
target when |predicted / measured - 1| <= 10% (issue 18).  Byte counts do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

BENCH_DIR = Path(__file__).resolve().parent
for _path in (BENCH_DIR.parent, BENCH_DIR):  # this checkout's pytrain (and its spawned ranks'), bench/harness/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from harness.machine import machine_description  # noqa: E402  (bench/harness/, as bench/conftest.py does)

from pytrain.testing.memory_model import QUANTITIES, Setup, measure, predict  # noqa: E402
from pytrain.trainers import spawn  # noqa: E402

TARGET = 0.10
#: (processes, layout name, tensor-parallel degree)
LAYOUTS = [(2, "DDP", 1), (2, "FSDP2 (ZeRO-3)", 1), (2, "TP 2", 2),
           (4, "DDP", 1), (4, "FSDP2 (ZeRO-3)", 1), (4, "DP 2 x TP 2", 2)]
#: (state dtype, activation checkpointing) of the runs of each layout
RUNS = [("fp32", False), ("bf16", True), ("int8", False)]


def strategy(name: str, tp: int) -> str:
    return "tp" if tp > 1 else "ddp" if name == "DDP" else "fsdp"


def setups(tp: int, name: str, **shape) -> List[Setup]:
    return [Setup(strategy(name, tp), state, ckpt, tp=tp, **shape) for state, ckpt in RUNS]


def rows(world: int, name: str, runs: List[Setup], per_rank: List[List[Dict[str, float]]]) -> List[Tuple]:
    """(layout, quantity, rank, predicted, measured) for every rank; quantities that do not depend on the run
    (params, grads, buckets) from the first run only."""
    out = []
    for i, setup in enumerate(runs):
        pred = predict(setup, world)
        for key in QUANTITIES:
            if key in ("params", "grads", "buckets") and i:
                continue
            if key == "buckets" and setup.strategy != "ddp":
                label = "other resident (FSDP / TP)"
            elif key == "optimizer":
                label = f"optimizer state {setup.state_dtype}"
            elif key.startswith("activation"):
                label = f"{key.replace('_', ' ')}, checkpointing {'on' if setup.checkpointing else 'off'}"
            else:
                label = {"buckets": "DDP buckets"}.get(key, key)
            for rank, measured in enumerate(per_rank):
                got = measured[i]
                states = got["params"] + got["grads"] + got["optimizer"]
                out.append((f"{world} x {name}", label, rank, pred[key], got[key], states))
    return out


def error(predicted: float, measured: float, states: float) -> float:
    """predicted / measured - 1; where 0 is predicted, the measured bytes as a fraction of the rank's
    parameters + gradients + optimizer state (what a missed resident buffer would add to the total)."""
    if predicted == 0:
        return measured / states
    return predicted / measured - 1


def table(all_rows: List[Tuple], header: Dict[str, str]) -> str:
    mib = 2**20
    lines = [f"# Memory model vs measured, per rank ({header['date'][:10]}, CPU)", "",
             "`python bench/bench_memory_model.py` (see its docstring for what is measured and how).",
             f"Machine: {header['cpu_model']} ({header['cpu_flags']}), {header['cores']} cores, load "
             f"{header['load_at_start']} at start; torch {header['torch']}, commit {header['commit']}, "
             f"{header['date']}.", "",
             "| layout | quantity | rank | predicted MiB | measured MiB | error | within 10% |",
             "|---|---|---|---|---|---|---|"]
    for layout, label, rank, pred, meas, states in all_rows:
        err = error(pred, meas, states)
        ok = "yes" if abs(err) <= TARGET else "**no**"
        shown = f"{err:+.1%}" if pred else f"{err:+.1%} of states"
        lines.append(f"| {layout} | {label} | {rank} | {pred / mib:.3f} | {meas / mib:.3f} | {shown} | {ok} |")
    misses = [r for r in all_rows if abs(error(*r[3:])) > TARGET]
    lines += ["", f"{len(all_rows) - len(misses)} of {len(all_rows)} rows within 10%.  error: predicted / measured "
              "- 1; where 0 is predicted, the measured bytes over the rank's parameters + gradients + optimizer state.",
              "", "What is predicted (pytrain/testing/memory_model.py `predict`, pytrain/cost/memory.py): model states "
              "per ZeRO (Rajbhandari et al. 2020) with TP splitting only the blocks' linears and DDP's buckets as a "
              "second gradient copy; activations left by the forward: Korthikanti et al. 2022's per-layer count "
              "(flash variant, 4-byte activations, no dropout, their Eq. 2 for TP) plus the output layer; the "
              "activation peak: `activation_peak` (the last layer's backward) + the gradients its peak node creates "
              "+ FSDP2's unsharded buffers (`fsdp_unsharded`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="process counts (default: 2 4)")
    args = parser.parse_args(argv)
    header = machine_description("cpu", os.getloadavg()[0])
    all_rows = []
    for world in args.procs:  # one launch per process count (a launch costs seconds of start-up)
        layouts = [(name, tp) for w, name, tp in LAYOUTS if w == world]
        runs = [setups(tp, name) for name, tp in layouts]
        per_rank = spawn(measure, world, [s for r in runs for s in r])
        for (name, _), layout_runs, first in zip(layouts, runs, range(0, len(runs) * len(RUNS), len(RUNS))):
            all_rows += rows(world, name, layout_runs, [rank[first:first + len(RUNS)] for rank in per_rank])
        print(f"{world} processes: done ({datetime.datetime.now():%H:%M:%S})", file=sys.stderr, flush=True)
    text = table(all_rows, header)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
