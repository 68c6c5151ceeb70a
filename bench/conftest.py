"""Benchmark harness for bench/: options, the GPT-like param set, machine ceilings, timing, one table.

Run from the repository root (or through ``pytrain bench``)::

    python -m pytest bench/                                  # every suite, on the CPU
    python -m pytest bench/bench_adamw.py --device cuda

Options:
  --device cpu|cuda   where the benchmarks run (cpu by default).
  --bench-scale S     multiplies the leading dimension of every GPT_SHAPES tensor; default
                      $PYTRAIN_BENCH_SCALE, else 1 on cpu (70.8M params) and 2 on cuda (141.6M),
                      e.g. 0.1 while developing.

Ceilings: every number is set against ceilings the suite measures itself on the machine it runs on
(roofline context, as torchao's float8 roofline and nanoGPT's ``estimate_mfu``): copy bandwidth (a
large tensor copy, bytes read + written per second, best of several) and fp32 matmul FLOP/s; on
CUDA also the device-to-device copy and the bf16 matmul.  Optimizer steps are memory-bound, so
each benchmark states the bytes its step must move (its byte model) and the table shows GB/s and
the fraction of the copy ceiling.

Timing: pytest-benchmark's ``benchmark.pedantic`` (warm-up rounds, then timed rounds; the median
is reported); on CUDA each timed step ends with a synchronize.  Without pytest-benchmark a
perf_counter loop with the same rounds stands in, so the suite also runs where only pytest is.

Results: each ``measure(...)`` records one Row; at the end of the session ONE table is printed
(case | torch ms | pytrain ms | ratio | pytrain GB/s | % of copy ceiling | notes), the rows are
appended with the machine description to bench/out/results.csv, and bench/out/latest.md gets the
same table as markdown.  The "torch" column is the baseline each case names in its notes
(torch.optim, or timm's pure-PyTorch optimizers).
"""
from __future__ import annotations

import csv
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

import pytrain
from pytrain.ops import NoImplementationError, registry
from pytrain.testing.optim_compare import GPT_SHAPES, make_params

OUT_DIR = Path(__file__).resolve().parent / "out"
ROUNDS = {"cpu": (2, 5), "cuda": (10, 50)}  # device -> (warm-up rounds, timed rounds)
BASE_PROVIDERS = ("torch", "pytrain")
CUDA_PROVIDERS = ("triton",)  # pytrain forced onto its Triton backend, next to the automatic choice
PROVIDER_IMPL = {"triton": "triton"}  # provider -> forced pytrain backend (others: automatic)
CEILING_FORMATS = {"copy_GBps": "copy {:.3g} GB/s", "update_GBps": "in-place update {:.3g} GB/s", "fp32_matmul_TFLOPs": "fp32 matmul {:.3g} TFLOP/s",
                   "bf16_matmul_TFLOPs": "bf16 matmul {:.3g} TFLOP/s"}


# ------------------------------------------------------------------------------------------ options
def pytest_addoption(parser):
    group = parser.getgroup("pytrain bench")
    group.addoption("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on (default cpu)")
    group.addoption("--bench-scale", type=float, default=None,
                    help="scale of the GPT_SHAPES leading dims (default $PYTRAIN_BENCH_SCALE, else 1 cpu / 2 cuda)")


def pytest_configure(config):
    if config.getoption("device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    config.stash[RESULTS] = Results(device=config.getoption("device"), load_at_start=os.getloadavg()[0])


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when a directory is given (`pytest bench/`); files named on the command
    line are collected by pytest itself whatever their name."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Providers: the module's PROVIDERS (default torch, pytrain), plus on CUDA its CUDA_PROVIDERS (default:
    pytrain forced onto its Triton backend)."""
    if "provider" in metafunc.fixturenames:
        providers = list(getattr(metafunc.module, "PROVIDERS", BASE_PROVIDERS))
        if metafunc.config.getoption("device") == "cuda":
            providers += getattr(metafunc.module, "CUDA_PROVIDERS", CUDA_PROVIDERS)
        metafunc.parametrize("provider", providers)


def bench_scale(config) -> float:
    scale = config.getoption("bench_scale") or os.environ.get("PYTRAIN_BENCH_SCALE")
    if scale:
        return float(scale)
    return 2.0 if config.getoption("device") == "cuda" else 1.0


# ------------------------------------------------------------------------------------------ param set
@dataclass
class ParamSet:
    """The benchmarks' fp32 params and gradients; ``fresh()`` gives each case its own copies."""

    params: List[Tensor]
    grads: List[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def fresh(self) -> List[Tensor]:
        out = []
        for p, g in zip(self.params, self.grads):
            q = p.clone().requires_grad_()
            q.grad = g.clone()
            out.append(q)
        return out


def scaled_shapes(scale: float) -> List[Tuple[int, ...]]:
    """GPT_SHAPES with every leading dim times ``scale``: same 50 tensors, ``scale`` times the params."""
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in GPT_SHAPES]


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("device"))


@pytest.fixture(scope="session")
def param_set(pytestconfig, bench_device, results) -> ParamSet:
    scale = bench_scale(pytestconfig)
    shapes = scaled_shapes(scale)
    params = [p.detach() for p in make_params(shapes, device=bench_device, seed=0)]
    grads = [g.detach() for g in make_params(shapes, device=bench_device, seed=1)]
    out = ParamSet(params, grads)
    results.param_set = f"{out.numel / 1e6:.1f}M fp32 params in {len(shapes)} tensors (GPT_SHAPES x {scale:g})"
    return out


@pytest.fixture
def impl(provider) -> Optional[str]:
    """The pytrain backend a provider forces (None: pytrain's automatic choice)."""
    return PROVIDER_IMPL.get(provider)


# ------------------------------------------------------------------------------------------ ceilings
def _best_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(device: torch.device) -> Dict[str, float]:
    """Copy GB/s (read + written) and matmul TFLOP/s on random data, best of several runs.

    Sizes are far beyond the last-level cache (256 MiB copies on the CPU, 1 GiB on CUDA) and big
    enough to fill the machine (2048^3 fp32 product on the CPU, 8192^3 on CUDA)."""
    cuda = device.type == "cuda"
    src = torch.randn((1 << 28) if cuda else (1 << 26), device=device)
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), device, 20) / 1e9,
           # read + write of the same lines (what an optimizer step does): no write-allocate reads
           "update_GBps": 2 * src.nbytes / _best_seconds(lambda: src.add_(1.0), device, 20) / 1e9}
    del src, dst
    n = 8192 if cuda else 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out[f"{name}_matmul_TFLOPs"] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, 5) / 1e12
    return out


@pytest.fixture(scope="session")
def ceilings(bench_device, results) -> Dict[str, Dict[str, float]]:
    """Ceilings of the CPU, and of the GPU too when benchmarking on CUDA."""
    devices = [torch.device("cpu")] + ([bench_device] if bench_device.type == "cuda" else [])
    results.ceilings = {d.type: measure_ceilings(d) for d in devices}
    return results.ceilings


# ------------------------------------------------------------------------------------------ results
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
            f"device **{self.device}**: {machine['gpu'] + '; host ' if machine['gpu'] else ''}{machine['cpu_model']}, "
            f"{machine['cores']} cores ({machine['threads']} torch threads, load {machine['load_at_start']} at start); "
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


RESULTS = pytest.StashKey[Results]()


@pytest.fixture(scope="session")
def results(pytestconfig) -> Results:
    return pytestconfig.stash[RESULTS]


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    median: float
    min: float
    max: float
    rounds: int


def _time_rounds(request, target: Callable[[], None], group: str, warmup: int, rounds: int) -> Optional[Timing]:
    """Median over ``rounds`` after ``warmup``; None when pytest-benchmark is disabled (--benchmark-disable)."""
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


@pytest.fixture
def measure(request, bench_device, ceilings, results):
    """``measure(step, case=..., provider=..., bytes_moved=..., ...)`` times ``step`` and records a Row.

    step: one optimizer step (gradients already in place).  bytes_moved: the case's byte model.
    optimizer: to report its state bytes.  op / impl: the pytrain op and forced backend (names the
    backend in the notes); baseline: what the torch provider runs.  target: the case's goal, shown
    in the notes (benchmarks assert nothing).  A forced backend that cannot run skips the case.
    """
    suite = Path(request.module.__file__).stem.removeprefix("bench_")
    warmup, rounds = ROUNDS[bench_device.type]

    def run(step: Callable[[], object], *, case: str, provider: str, bytes_moved: float, op: str,
            optimizer: Optional[torch.optim.Optimizer] = None, impl: Optional[str] = None, baseline: str = "",
            target: str = "", flops: float = 0.0, ceiling: str = "copy_GBps") -> None:
        def target_fn():
            step()
            if bench_device.type == "cuda":
                torch.cuda.synchronize(bench_device)

        try:
            target_fn()  # first step: creates the optimizer state outside the timed rounds
        except NoImplementationError as exc:
            pytest.skip(str(exc))
        timing = _time_rounds(request, target_fn, f"{suite}: {case}", warmup, rounds)
        if timing is None:
            return
        runs = baseline if provider == "torch" else backend_name(op, bench_device, impl)
        results.rows.append(Row(suite, case, provider, runs, timing.median, timing.min, timing.max, timing.rounds,
                                bytes_moved, flops, state_bytes(optimizer) if optimizer is not None else None,
                                target, ceiling))

    yield run
    gc.collect()  # each case holds ~1 GB (params, grads, states): free it before the next
    if bench_device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ report
def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description(device: str, load_at_start: float) -> Dict[str, str]:
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    gpu = ""
    if device == "cuda":
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        gpu = f"{torch.cuda.get_device_name()} (driver {driver[0] if driver else 'unknown'})"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "gpu": gpu,
        "cpu_model": _cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "load_at_start": f"{load_at_start:.2f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "pytrain": pytrain.__version__,
    }


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the one table last, append the rows to bench/out/results.csv, write bench/out/latest.md."""
    results = config.stash[RESULTS]
    if not results.rows and not results.memory:
        return
    machine = machine_description(results.device, results.load_at_start)
    text = results.markdown(machine)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "latest.md").write_text(text)
    results.append_csv(OUT_DIR / "results.csv", machine)
    terminalreporter.write_sep("=", "pytrain benchmark summary")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(written to {OUT_DIR / 'latest.md'}; rows appended to {OUT_DIR / 'results.csv'})")
