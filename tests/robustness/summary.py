"""Print the bad-input suite's outcomes: one row per family and a total (tried, clear errors, correct results,
wrong errors, silent wrong answers, crashes, hangs, out-of-memory), then every case that did not pass.

    python -m tests.robustness.summary                       # every case
    python -m tests.robustness.summary topk adamw             # cases whose id (family::name) contains a word
    python -m tests.robustness.summary FusedLARS::lr_nan -v   # -v: every case's outcome, not only failures
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pytrain.testing.robustness import format_summary, load_table, run_cases

TABLES = sorted(Path(__file__).parent.glob("cases_*.py"))


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args
    words = [a for a in args if a != "-v"]
    cases = [(t, c) for t in TABLES for c in load_table(t) if not words or any(w in c.id for w in words)]
    start = time.monotonic()
    results = run_cases(cases)
    ordered = [results[c.id] for _, c in cases]
    print(format_summary(ordered))
    print(f"\n{len(ordered)} cases in {time.monotonic() - start:.1f} s")
    slowest = sorted(ordered, key=lambda r: -r.seconds)[:8]
    print("slowest: " + ", ".join(f"{r.id} {r.seconds:.2f} s" for r in slowest))
    if verbose:
        print("\nevery case:")
        for r in ordered:
            print(f"- {r.describe()}")
    failed = [r for r in ordered if not r.passed]
    if failed:
        print(f"\n{len(failed)} not passing:")
        for r in failed:
            print(f"- {r.describe()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
