#!/usr/bin/env bash
# One call on a GPU machine that has only this repository copied over (and torch, triton, nvcc there):
#   1. print the GPU (nvidia-smi), driver, nvcc, Python, torch and triton versions;
#   2. make sure pytest / pytest-benchmark / timm import (installing them only from a local wheel folder);
#   3. build the extension with its CUDA kernels (sm_90), failing loudly if CUDA cannot be built;
#   4. run the GPU tests (-m gpu, compiled Triton), then the rest of tests/ (the backend tests now see
#      the cuda and triton backends available);
#   5. run the benchmarks on CUDA (bench/, >= 100M params) and print their table last.
# Each stage runs under its own time limit so the whole stays under 10 minutes and a stuck stage
# cannot eat the benchmarks.  Logs and results land in bench/out/ (and in $OUT when set).
#
# Usage: bash bench/gpu_suite.sh [--skip-build] [--skip-tests]
# Environment:
#   PYTHON   interpreter holding torch (default python3)
#   WHEELS   folder of wheels for a missing pytest, pytest-benchmark or timm (default $PIP_FIND_LINKS, else .whl);
#            nothing is downloaded
#   OUT      also copy the table, the CSV and the logs there
#   BUILD_S GPU_TESTS_S TESTS_S BENCH_S   stage time limits in seconds (defaults 240 90 120 120)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=bench/out
WHEELS=${WHEELS:-${PIP_FIND_LINKS:-.whl}}
SKIP_BUILD=0
SKIP_TESTS=0
for arg in "$@"; do
  case $arg in
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--skip-build] [--skip-tests]" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
rm -f "$LOGS/latest.md" "$LOGS"/gpu_*.log  # never show a table or log left by an earlier run
SUMMARY=()
FAILED=0

# stage NAME LIMIT_S LOG CMD...: run CMD under a time limit, log everything to bench/out/gpu_LOG.log,
# show the log's end, and record the outcome (pytest's exit 5, "no tests collected", is not a failure).
stage() {
  local name=$1 limit=$2 log=$LOGS/gpu_$3.log
  shift 3
  echo
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  local status="ok"
  case $rc in
    0) ;;
    5) status="no tests" ;;
    124|137) status="TIMEOUT"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("$(printf '%-34s %-18s %5ss' "$name" "$status" $((SECONDS - start)))")
}

echo "=== machine ==="
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>/dev/null
nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not found"
"$PY" - <<'PY' || { echo "FATAL: $PY cannot import torch, or sees no CUDA device" >&2; exit 2; }
import importlib.metadata, os, platform, torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
props = torch.cuda.get_device_properties(0)
try:
    triton = importlib.metadata.version("triton")
except importlib.metadata.PackageNotFoundError:
    triton = "not installed"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton}")
print(f"gpu {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
      f"{props.total_memory / 2**30:.0f} GiB; host {os.cpu_count()} cores")
PY

echo
echo "=== test and benchmark packages ==="
declare -A DIST=([pytest]=pytest [pytest_benchmark]=pytest-benchmark [timm]=timm)
missing=()
for mod in pytest pytest_benchmark timm; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("${DIST[$mod]}")
done
if ((${#missing[@]})); then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing ${missing[*]} from $WHEELS into /tmp/pytrain-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" --target /tmp/pytrain-site \
      "${missing[@]}" && export PYTHONPATH=/tmp/pytrain-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "missing: ${missing[*]}; no wheel folder at $WHEELS (set WHEELS), nothing is downloaded"
  fi
fi
"$PY" -c "import pytest" 2>/dev/null || {
  echo "FATAL: pytest is not importable: the tests and benchmarks need it; put wheels of pytest (and" \
       "pytest-benchmark, timm) in $WHEELS and run again" >&2
  exit 2
}
"$PY" -c "import pytest_benchmark" 2>/dev/null \
  || echo "note: no pytest-benchmark: bench/harness/timing.py times with its plain perf_counter loop"
"$PY" -c "import timm" 2>/dev/null || echo "note: no timm: the LARS/LAMB benchmarks against timm will be skipped"

if ((!SKIP_BUILD)); then
  stage "build (CUDA extension, sm_90)" "${BUILD_S:-240}" build \
    env PYTRAIN_FORCE_CUDA_BUILD=1 PYTRAIN_CUDA_ARCHS=90 \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
fi
stage "extension check" 60 info "$PY" - <<'PY'
import pytrain
from pytrain.info import format_info
print(format_info(pytrain.info()))
ext = pytrain._extension.load_extension()[0]
assert ext is not None and ext.built_with_cuda(), "pytrain._C is missing or was built without its CUDA kernels"
PY

if ((!SKIP_TESTS)); then
  stage "GPU tests (-m gpu)" "${GPU_TESTS_S:-90}" gpu_tests \
    env TRITON_INTERPRET=0 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  stage "tests (not gpu)" "${TESTS_S:-120}" tests \
    "$PY" -m pytest tests -m "not gpu" -q -p no:cacheprovider "${xdist[@]}"
fi

# the single-device kernel suites (hooks, cost and pipeline start gloo processes on the CPU: not GPU work)
GPU_SUITES=(adamw lars lamb global_norm attention quantize topk powersgd models)
stage "benchmarks (--device cuda)" "${BENCH_S:-120}" bench "$PY" -m pytrain bench --device cuda "${GPU_SUITES[@]}"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$LOGS"/gpu_*.log "$OUT"/ 2>/dev/null
  cp "$LOGS/latest.md" "$LOGS/results.csv" "$OUT"/ 2>/dev/null
fi

echo
echo "=== stages ==="
printf '%s\n' "${SUMMARY[@]}"
echo
if [[ -f "$LOGS/latest.md" ]]; then
  cat "$LOGS/latest.md"
else
  echo "no benchmark table: see $LOGS/gpu_bench.log"
fi
exit "$FAILED"
