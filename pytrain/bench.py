"""``pytrain bench [names] [--device cpu|cuda] [--scale S] [-- pytest args]``: run the benchmark suites.

Runs ``python -m pytest bench/bench_<name>.py ...`` (every suite when no names are given) from the
repository root; bench/conftest.py and its harness (bench/harness/) time each case (pytest-benchmark),
print one table last and write bench/out/latest.md and bench/out/results.csv.  The suites live in the
source repository, not in the installed package: without bench/ next to the package this says so and stops.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
# pytest-benchmark's options: no GC pauses inside timed rounds, a short per-case table by name
BENCHMARK_ARGS = ["--benchmark-disable-gc", "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name"]
# torch backs large CPU tensors with transparent huge pages: without it, every freshly allocated
# output (quantize / dequantize, top-k) is page-faulted in 4 KiB pages inside the timed region.
BENCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def suites() -> List[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def pytest_command(names: List[str], device: str, scale: Optional[float], extra: List[str]) -> List[str]:
    files = [str(BENCH_DIR / f"bench_{name}.py") for name in names or suites()]
    cmd = [sys.executable, "-m", "pytest", *files, "--device", device, "-q", "-p", "no:cacheprovider"]
    if scale is not None:
        cmd += ["--bench-scale", str(scale)]
    if importlib.util.find_spec("pytest_benchmark") is not None:
        cmd += BENCHMARK_ARGS
    return cmd + extra


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    parser = argparse.ArgumentParser(prog="pytrain bench", description="run pytrain's benchmark suites (bench/)",
                                     epilog="Arguments after -- go to pytest (e.g. -- -k fp32).")
    parser.add_argument("names", nargs="*", help="suites to run (bench/bench_<name>.py); default: all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on")
    parser.add_argument("--scale", type=float, default=None,
                        help="param-set scale (default $PYTRAIN_BENCH_SCALE, else 1 on cpu = 70.8M params, 2 on cuda)")
    opts = parser.parse_args(args)

    if not BENCH_DIR.is_dir():
        print(f"pytrain bench: no benchmark suites at {BENCH_DIR}: they ship with the source repository, not the "
              "installed package; run it from a checkout installed with `pip install -e .`", file=sys.stderr)
        return 2
    unknown = sorted(set(opts.names) - set(suites()))
    if unknown:
        print(f"pytrain bench: no suite {', '.join(unknown)} (available: {', '.join(suites())})", file=sys.stderr)
        return 2
    if importlib.util.find_spec("pytest") is None:
        print("pytrain bench: pytest is not installed (pip install 'pytrain[bench]' installs pytest-benchmark and timm "
              "with it)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("pytest_benchmark") is None:
        print("pytrain bench: pytest-benchmark is not installed; timing with bench/harness/timing.py's plain loop",
              file=sys.stderr)
    return subprocess.call(pytest_command(opts.names, opts.device, opts.scale, extra), cwd=ROOT,
                           env={**BENCH_ENV, **os.environ})


if __name__ == "__main__":
    sys.exit(main())
