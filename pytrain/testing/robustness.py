"""A harness for table-driven bad-input tests: each case calls a public op or API with one bad or edge
input and states what must happen, and the harness runs it where a crash cannot take the caller down.

A ``Case`` is (family, name, run, expect, isolate).  ``run()`` builds its inputs and makes the call;
``expect`` is one of

* ``Raises(exc, pattern)``: a clear error, an instance of ``exc`` whose message matches ``pattern``
  (a regex searched in ``str(error)``, which should name the argument);
* ``Correct(atol, rtol)``: a correct result: ``run()`` returns ``(got, want)``, nested tuples / lists of
  tensors and numbers, ``want`` from the op's float64 reference or from torch; compared in float64 with
  NaN equal to NaN (so NaN propagation is checked where the reference propagates it);
* ``Either(raises, correct)``: a layout the op may support or reject, never silently mishandle.

Every case ends in one outcome:

    clear error    the expected exception (Raises)            pass
    correct        the result matched (Correct)                pass
    wrong error    another exception, another message, or an exception where a result was expected
    silent wrong   no error where one was expected, or a result that does not match
    crash          the process died (signal, abort, exit) during the case
    hang           the case ran past its time limit (killed)
    oom            the case ran out of the memory cap (MemoryError, failed allocation)

Isolated cases (``isolate=True``, the default: anything reaching C++ or Triton code) run in worker
processes, batched (``workers`` processes share the cases, so torch is imported that many times, not once
per case), under a memory cap (``RLIMIT_AS``: the worker's address space after its imports plus
``MEMORY_CAP``) with one thread each.  The worker reports per case as JSON lines (a ``start`` record, then
the outcome), so when it dies the parent knows which case killed it, records that case as a crash and
starts a new worker for the remaining cases (the cause shows in order, not by rerunning one by one).  The
parent watches the time each case takes and kills a worker whose case runs past ``CASE_TIMEOUT`` (a hang;
the remaining cases go on in a new worker).  Pure-Python validation cases (``isolate=False``) run in the
calling process.

Command line (the worker): ``python -m pytrain.testing.robustness IDS_FILE OUT_FILE``, IDS_FILE a JSON list
of [table path, case id] pairs.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

CASE_TIMEOUT = 10.0  # seconds one case may run in a worker before it counts as a hang
START_TIMEOUT = 90.0  # seconds a worker may take to import torch, pytrain and warm up (a loaded CI machine)
MEMORY_CAP = 1 << 30  # bytes of address space a worker may add to what it has after its imports
OUTCOMES = ("clear error", "correct", "wrong error", "silent wrong", "crash", "hang", "oom")
PASSING = ("clear error", "correct")

ExcTypes = Union[Type[BaseException], Tuple[Type[BaseException], ...]]


# ------------------------------------------------------------------------------------------ expectations
@dataclass(frozen=True)
class Raises:
    """A clear error: ``exc`` (a type or a tuple of types) with a message matching ``pattern``."""
    exc: ExcTypes
    pattern: str

    def describe(self) -> str:
        names = self.exc if isinstance(self.exc, tuple) else (self.exc,)
        return f"raises {'/'.join(t.__name__ for t in names)} /{self.pattern}/"


@dataclass(frozen=True)
class Correct:
    """A correct result: ``run()`` returns ``(got, want)``; compared in float64, NaN == NaN."""
    atol: float = 1e-6
    rtol: float = 1e-5

    def describe(self) -> str:
        return f"correct (atol {self.atol:g}, rtol {self.rtol:g})"


@dataclass(frozen=True)
class Either:
    """Either the clear error or the correct result."""
    raises: Raises
    correct: Correct = Correct()

    def describe(self) -> str:
        return f"{self.raises.describe()} or {self.correct.describe()}"


Expect = Union[Raises, Correct, Either]


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    run: Callable[[], Any] = field(compare=False)
    expect: Expect = field(compare=False)
    isolate: bool = True

    @property
    def id(self) -> str:
        return f"{self.family}::{self.name}"


@dataclass
class Result:
    id: str
    outcome: str
    detail: str = ""
    expected: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome in PASSING

    def describe(self) -> str:
        return f"{self.id}: {self.outcome} (expected: {self.expected}): {self.detail}"


# ------------------------------------------------------------------------------------------ comparison
def _flatten(value: Any, path: str = "") -> List[Tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        out = [(f"{path}#len", len(value))]
        for i, v in enumerate(value):
            out += _flatten(v, f"{path}[{i}]")
        return out
    return [(path, value)]


def compare(got: Any, want: Any, atol: float, rtol: float) -> Optional[str]:
    """None if ``got`` matches ``want`` (same structure; tensors of the same shape close in float64, NaN
    equal to NaN; numbers likewise), else what differs."""
    import torch

    g, w = _flatten(got), _flatten(want)
    if [p for p, _ in g] != [p for p, _ in w]:
        return f"structure differs: got {[p for p, _ in g]}, want {[p for p, _ in w]}"
    for (path, a), (_, b) in zip(g, w):
        if path.endswith("#len"):
            if a != b:
                return f"{path[:-4] or 'result'} has {a} items, want {b}"
            continue
        if torch.is_tensor(a) or torch.is_tensor(b):
            if not (torch.is_tensor(a) and torch.is_tensor(b)):
                return f"{path or 'result'}: got {type(a).__name__}, want {type(b).__name__}"
            if a.shape != b.shape:
                return f"{path or 'result'}: shape {tuple(a.shape)}, want {tuple(b.shape)}"
            if a.device.type == "meta" or b.device.type == "meta":
                if a.device != b.device:
                    return f"{path or 'result'}: on {a.device}, want {b.device}"
                continue
            try:
                torch.testing.assert_close(a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64),
                                           atol=atol, rtol=rtol, equal_nan=True)
            except AssertionError as e:
                return f"{path or 'result'}: {' '.join(str(e).split())[:300]}"
        elif isinstance(a, float) or isinstance(b, float):
            if not (math.isnan(a) and math.isnan(b)) and not abs(a - b) <= atol + rtol * abs(b):
                return f"{path or 'result'}: {a!r}, want {b!r}"
        elif a != b:
            return f"{path or 'result'}: {a!r}, want {b!r}"
    return None


# ------------------------------------------------------------------------------------------ one case
def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "std::bad_alloc" in text


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"


def run_case(case: Case) -> Result:
    """Run one case in this process and classify what happened (crashes and hangs are the caller's to see)."""
    expect = case.expect
    raises = expect if isinstance(expect, Raises) else getattr(expect, "raises", None)
    correct = expect if isinstance(expect, Correct) else getattr(expect, "correct", None)
    result = Result(case.id, "", expected=expect.describe())
    start = time.perf_counter()
    try:
        value = case.run()
    except Exception as error:  # every exception is an outcome to classify
        result.seconds = time.perf_counter() - start
        if _is_oom(error):
            result.outcome, result.detail = "oom", _one_line(error)
        elif raises is not None and isinstance(error, raises.exc) and re.search(raises.pattern, str(error)):
            result.outcome, result.detail = "clear error", _one_line(error)
        else:
            where = traceback.extract_tb(error.__traceback__)[-1]
            result.outcome = "wrong error"
            result.detail = f"{_one_line(error)} (at {Path(where.filename).name}:{where.lineno})"
        return result
    result.seconds = time.perf_counter() - start
    if correct is None:
        result.outcome, result.detail = "silent wrong", f"accepted: returned {_short(value)}"
        return result
    try:
        got, want = value
    except (TypeError, ValueError):
        result.outcome, result.detail = "silent wrong", f"the case returned {_short(value)}, not (got, want)"
        return result
    problem = compare(got, want, correct.atol, correct.rtol)
    result.outcome, result.detail = ("silent wrong", problem) if problem else ("correct", "")
    return result


def _short(value: Any) -> str:
    import torch

    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)} {value.dtype} on {value.device}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}: [" + ", ".join(_short(v) for v in value[:3]) + "]"
    return " ".join(repr(value).split())[:120]


# ------------------------------------------------------------------------------------------ tables
def _table_module(path: Union[str, Path]):
    path = Path(path).resolve()
    name = f"_robustness_table_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_table(path: Union[str, Path]) -> List[Case]:
    """The cases of a table file: a module with ``cases() -> list of Case`` and, optionally, ``warmup()``, which
    a worker calls once before its first case (lazy imports and first-call set-up would otherwise count against
    the first case's time limit)."""
    cases = _table_module(path).cases()
    ids = [c.id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path.name}: duplicate case ids {duplicates}")
    return cases


# ------------------------------------------------------------------------------------------ worker
def _cap_memory(extra: int) -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))


def _worker(ids_file: str, out_file: str) -> None:
    import torch

    torch.set_num_threads(1)
    pairs = json.loads(Path(ids_file).read_text())
    tables = sorted({t for t, _ in pairs})
    cases = {c.id: c for table in tables for c in load_table(table)}
    for table in tables:
        getattr(_table_module(table), "warmup", lambda: None)()
    _cap_memory(MEMORY_CAP)
    with open(out_file, "a", buffering=1) as out:
        for _, case_id in pairs:
            out.write(json.dumps({"id": case_id, "event": "start"}) + "\n")
            out.flush()
            r = run_case(cases[case_id])
            out.write(json.dumps({"id": r.id, "event": "done", "outcome": r.outcome, "detail": r.detail,
                                  "seconds": r.seconds}) + "\n")
            out.flush()


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_INTERPRET", "1")  # a no-GPU machine: Triton backends run interpreted
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_batch(batch: List[Tuple[str, Case]], case_timeout: float) -> List[Result]:
    """Run ``(table, case)`` pairs in worker processes until each has an outcome (a new worker after each death)."""
    expected = {c.id: c.expect.describe() for _, c in batch}
    table_of = {c.id: t for t, c in batch}
    results: Dict[str, Result] = {}
    pending = [c.id for _, c in batch]
    with tempfile.TemporaryDirectory(prefix="pytrain-robustness-") as tmp:
        attempt = 0
        while pending:
            attempt += 1
            ids_file, out_file, err_file = (Path(tmp) / f"{n}{attempt}" for n in ("ids", "out", "err"))
            ids_file.write_text(json.dumps([[table_of[i], i] for i in pending]))
            out_file.touch()
            with open(err_file, "w") as err:
                proc = subprocess.Popen([sys.executable, "-m", "pytrain.testing.robustness", str(ids_file),
                                         str(out_file)], env=_env(), stdout=subprocess.DEVNULL, stderr=err)
            current, since, hung = None, time.monotonic(), False
            with open(out_file) as reader:
                partial = ""
                while True:
                    rc = proc.poll()
                    partial += reader.read()
                    *complete, partial = partial.split("\n")  # the last piece: a record still being written
                    for line in complete:
                        record = json.loads(line)
                        if record["event"] == "start":
                            current, since = record["id"], time.monotonic()
                        else:
                            results[record["id"]] = Result(record["id"], record["outcome"], record["detail"],
                                                           expected[record["id"]], record["seconds"])
                            current = None
                    if rc is not None:
                        break
                    limit = case_timeout if current is not None else START_TIMEOUT
                    if time.monotonic() - since > limit:
                        proc.kill()
                        proc.wait()
                        hung = True
                        break
                    time.sleep(0.02)
            pending = [i for i in pending if i not in results]
            if not pending:
                break
            stderr_tail = " ".join(err_file.read_text().split()[-40:])
            if hung:
                outcome, detail = "hang", f"still running after {limit:g} s (killed)"
            elif proc.returncode < 0:
                outcome, detail = "crash", f"worker died of {_signal_name(proc.returncode)}: {stderr_tail}"
            else:
                outcome, detail = "crash", f"worker exited with status {proc.returncode}: {stderr_tail}"
            if current is None:
                # died or stuck outside any case (start-up, a table's warmup): every pending case shares the fate
                for i in pending:
                    results[i] = Result(i, outcome, detail, expected[i])
                break
            results[current] = Result(current, outcome, detail, expected[current])
            pending.remove(current)
    return [results[c.id] for _, c in batch]


def run_cases(table_cases: List[Tuple[str, Case]], *, workers: int = 2,
              case_timeout: float = CASE_TIMEOUT) -> Dict[str, Result]:
    """Run ``(table path, case)`` pairs: isolated ones in ``workers`` worker processes at a time (each takes
    every ``workers``-th case, so slow families spread over them), the others here.  Returns id -> Result."""
    isolated = [(str(t), c) for t, c in table_cases if c.isolate]
    local = [c for _, c in table_cases if not c.isolate]
    workers = max(1, workers)
    batches = [b for b in (isolated[i::workers] for i in range(workers)) if b]
    results: Dict[str, Result] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_batch, batch, case_timeout) for batch in batches]
        for case in local:
            results[case.id] = run_case(case)
        for future in futures:
            for r in future.result():
                results[r.id] = r
    return results


def summarize(results: Sequence[Result]) -> Dict[str, Dict[str, int]]:
    """family -> outcome -> count (plus "tried"), with a "total" row."""
    table: Dict[str, Dict[str, int]] = {}
    for r in results:
        family = r.id.split("::")[0]
        for key in (family, "total"):
            row = table.setdefault(key, {"tried": 0, **{o: 0 for o in OUTCOMES}})
            row["tried"] += 1
            row[r.outcome] += 1
    total = table.pop("total", None)
    out = dict(sorted(table.items()))
    if total is not None:
        out["total"] = total
    return out


def format_summary(results: Sequence[Result]) -> str:
    """A markdown table: per family, cases tried and each outcome."""
    rows = summarize(results)
    header = ["family", "tried", *OUTCOMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, counts in rows.items():
        name = f"**{family}**" if family == "total" else family
        lines.append("| " + " | ".join([name, str(counts["tried"])] + [str(counts[o]) for o in OUTCOMES]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    # through the imported module, not this ``__main__`` copy: the tables' Case / Raises / Correct are its classes
    from pytrain.testing import robustness

    robustness._worker(*sys.argv[1:3])
