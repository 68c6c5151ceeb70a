"""Benchmark harness for bench/: measured ceilings, the param set, timing, the one results table and the
machine description.  No pytest in here: bench/conftest.py holds the hooks and fixtures that use it.

Ceilings (ceilings.py): every number is set against ceilings the suite measures itself on the machine
it runs on (roofline context, as torchao's float8 roofline and nanoGPT's ``estimate_mfu``): copy
bandwidth (a large tensor copy, bytes read + written per second, best of several) and fp32 matmul
FLOP/s; on CUDA also the device-to-device copy and the bf16 matmul.  Optimizer steps are
memory-bound, so each benchmark states the bytes its step must move (its byte model) and the table
shows GB/s and the fraction of the copy ceiling.

Timing (timing.py): pytest-benchmark's ``benchmark.pedantic`` (warm-up rounds, then timed rounds; the
median is reported); on CUDA each timed step ends with a synchronize.  Without pytest-benchmark a
perf_counter loop with the same rounds stands in, so the suite also runs where only pytest is.

Results (tables.py, machine.py): each ``measure(...)`` records one Row; at the end of the session ONE
table is printed (case | torch ms | pytrain ms | ratio | pytrain GB/s | % of copy ceiling | notes), the
rows are appended with the machine description to bench/out/results.csv, and bench/out/latest.md gets
the same table as markdown.  The "torch" column is the baseline each case names in its notes
(torch.optim, or timm's pure-PyTorch optimizers).

Imported as the top-level package ``harness``: bench/conftest.py puts bench/ first on sys.path (see
there), and a script run as ``python bench/bench_<name>.py`` has bench/ there already.
"""
from .ceilings import CEILING_FORMATS, measure_ceilings
from .machine import machine_description
from .params import ParamSet, scaled_shapes
from .tables import BASE_PROVIDERS, Results, Row
from .timing import ROUNDS, Timing, backend_name, peak_rss_above_start, state_bytes, time_rounds

__all__ = ["CEILING_FORMATS", "measure_ceilings", "machine_description", "ParamSet", "scaled_shapes",
           "BASE_PROVIDERS", "Results", "Row", "ROUNDS", "Timing", "backend_name", "peak_rss_above_start",
           "state_bytes", "time_rounds"]
