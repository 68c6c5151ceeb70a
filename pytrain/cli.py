"""The ``pytrain`` command: ``pytrain info | train [options] | distill [options] | bench [names] | cost | plan | tune | plot``."""
from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: pytrain <command> [options]

commands:
  info            versions, CPU/GPU features, and which backend serves each op (and why not)
  train [opts]    the main job: train a small transformer on the embedded corpus (pytrain train --help)
  distill [opts]  distil a train checkpoint into a smaller GPT, against the same student without a teacher
                  (pytrain distill --help)
  bench [names]   run the benchmark suites (bench/bench_<name>.py; all when no names) and print one table
  cost [opts]     the cost model of a described model and cluster (pytrain cost --help)
  plan [opts]     DP/PP/TP configurations ranked by predicted step time (pytrain plan --help)
  tune [opts]     hyperparameter search over the main job with Optuna (pytrain tune --help)
  plot RUN...     PNG plots of runs (TensorBoard dirs or JSON-lines logs) or --bench RESULTS (pytrain plot --help)
"""


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "info":
        import pytrain
        from .info import format_info

        print(format_info(pytrain.info()))
        return 0
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    if command == "distill":
        from .distill import main as distill_main

        return distill_main(rest)
    if command in ("cost", "plan"):
        from .cost.cli import main as cost_main

        return cost_main(rest, command=command)
    if command == "tune":
        from .tune import main as tune_main

        return tune_main(rest)
    if command == "plot":
        from .plot import main as plot_main

        return plot_main(rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"pytrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
