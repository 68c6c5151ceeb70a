"""pytest hooks and fixtures for bench/: options, providers, the param set, ceilings, ``measure``, the table.

Run from the repository root (or through ``pytrain bench``)::

    python -m pytest bench/                                  # every suite, on the CPU
    python -m pytest bench/bench_adamw.py --device cuda

Options:
  --device cpu|cuda   where the benchmarks run (cpu by default).
  --bench-scale S     multiplies the leading dimension of every GPT_SHAPES tensor; default
                      $PYTRAIN_BENCH_SCALE, else 1 on cpu (70.8M params) and 2 on cuda (141.6M),
                      e.g. 0.1 while developing.

What is measured and how (ceilings, timing, the one table, the machine description) lives in the
harness package, bench/harness/; this file only wires it into pytest.

Importing the harness: pytest.ini runs pytest with ``--import-mode=importlib``, which puts no test
directory on sys.path, so the lines below put bench/ first on it and import ``harness`` as a top-level
package, as pytest's default (prepend) mode would have.  That works however the suites are started
(``pytrain bench``, ``python -m pytest`` or the ``pytest`` script, from any directory) and in the
scripts bench_hooks.py runs as ``python bench/bench_hooks.py`` (bench/ is their sys.path[0]), and the
harness has one module name, so ``harness.Row`` is one class in conftest and in every suite.  The
suites get the harness's objects through the fixtures below; a suite that needs a harness type
imports it: ``from harness import Row``.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from harness import (BASE_PROVIDERS, ROUNDS, ParamSet, Results, Row, backend_name,  # noqa: E402
                     machine_description, measure_ceilings, scaled_shapes, state_bytes, time_rounds)
from pytrain.ops import NoImplementationError  # noqa: E402
from pytrain.testing.optim_compare import make_params  # noqa: E402

OUT_DIR = BENCH_DIR / "out"
CUDA_PROVIDERS = ("triton",)  # pytrain forced onto its Triton backend, next to the automatic choice
PROVIDER_IMPL = {"triton": "triton"}  # provider -> forced pytrain backend (others: automatic)
RESULTS = pytest.StashKey[Results]()


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


# ------------------------------------------------------------------------------------------ fixtures
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


@pytest.fixture(scope="session")
def ceilings(bench_device, results) -> Dict[str, Dict[str, float]]:
    """Ceilings of the CPU, and of the GPU too when benchmarking on CUDA."""
    devices = [torch.device("cpu")] + ([bench_device] if bench_device.type == "cuda" else [])
    results.ceilings = {d.type: measure_ceilings(d) for d in devices}
    return results.ceilings


@pytest.fixture(scope="session")
def results(pytestconfig) -> Results:
    return pytestconfig.stash[RESULTS]


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
        timed = step if bench_device.type == "cuda" else target_fn  # CUDA events need no synchronize per round
        timing = time_rounds(request, timed, f"{suite}: {case}", warmup, rounds, bench_device)
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
