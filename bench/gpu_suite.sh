#!/usr/bin/env bash
# One call on a GPU machine (15 minutes in all, a command at most 600 s): build, warm up, test, check
# memory, benchmark, and print one table.  Stages, each under its own limit (the limits add up to at
# most 500 s, so a call never runs into the machine's own limit and comes back empty):
#   machine     GPU, driver, nvcc, Python, torch, triton
#   build       the extension with its CUDA kernels for sm_90 (MAX_JOBS=16)
#   extension   pytrain info: the CUDA kernels must be there
#   warm-up     bench/gpu_smoke.py runs every op once (compiles the Triton kernels into the cache)
#   gpu tests   pytest -m gpu: every op's cuda and triton backends on CUDA tensors vs the float64 reference
#   memcheck    compute-sanitizer --tool memcheck over bench/gpu_smoke.py
#   bench <s>   each single-device suite on CUDA at GPU sizes, timed with CUDA events, one limit each
# The CPU-only and multi-rank tests are left out: CI runs them.  Each stage's log is copied to $OUT as
# soon as the stage ends; the benchmark table is printed last and written to $OUT/gpu_table.md.
#
# Usage: bash bench/gpu_suite.sh [--dry-run] [--skip-build]
#   --dry-run   print each stage with its limit and command, run nothing
# Environment: PYTHON (default python3), OUT (where logs and the table go; default bench/out)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=bench/out
OUT=${OUT:-$LOGS}
DRY=0
SKIP_BUILD=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run] [--skip-build]" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TRITON_INTERPRET=0
BENCH_SUITES=(adamw:25 lars:15 lamb:15 global_norm:10 attention:25 quantize:15 topk:10 powersgd:10)
SUMMARY=()
FAILED=0
TOTAL=0

# stage NAME LIMIT_S LOG CMD...: run CMD under its limit, log to bench/out/gpu_LOG.log, copy the log to
# $OUT at once, show its end and record the outcome.
stage() {
  local name=$1 limit=$2 log=$LOGS/gpu_$3.log
  shift 3
  TOTAL=$((TOTAL + limit))
  if ((DRY)); then
    printf '%-22s %4ss  %s\n' "$name" "$limit" "$*"
    return
  fi
  echo
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  mkdir -p "$OUT" && cp "$log" "$OUT"/ 2>/dev/null
  tail -n 20 "$log"
  local status="ok"
  case $rc in
    0) ;;
    124|137) status="TIMEOUT"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("$(printf '%-22s %-18s %4ss of %ss' "$name" "$status" $((SECONDS - start)) "$limit")")
}

((DRY)) || mkdir -p "$LOGS" "$OUT"
((DRY)) || rm -f "$LOGS"/gpu_*.log "$LOGS"/table_*.md "$LOGS/latest.md"  # nothing left from an earlier run

stage machine 10 machine bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv; \
nvcc --version | tail -n 2; $PY -c 'import platform, torch, triton; print(\"python\", platform.python_version(), \
\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); \
assert torch.cuda.is_available(), \"no CUDA device\"'"
if ((!SKIP_BUILD)); then
  stage build 130 build env PYTRAIN_FORCE_CUDA_BUILD=1 PYTRAIN_CUDA_ARCHS=90 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
stage extension 15 extension "$PY" -c "import pytrain; from pytrain.info import format_info; \
print(format_info(pytrain.info())); ext = pytrain._extension.load_extension()[0]; \
assert ext is not None and ext.built_with_cuda(), 'pytrain._C is missing or has no CUDA kernels'"
stage warm-up 40 warmup "$PY" bench/gpu_smoke.py
stage "gpu tests" 150 gpu_tests "$PY" -m pytest tests -m gpu -q -p no:cacheprovider
stage memcheck 30 memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" bench/gpu_smoke.py
for entry in "${BENCH_SUITES[@]}"; do
  suite=${entry%%:*}
  stage "bench $suite" "${entry##*:}" "bench_$suite" bash -c \
    "$PY -m pytrain bench --device cuda $suite && cp $LOGS/latest.md $LOGS/table_$suite.md"
done

if ((DRY)); then
  echo "sum of the stage limits: ${TOTAL}s"
  exit 0
fi
cat "$LOGS"/table_*.md > "$OUT/gpu_table.md" 2>/dev/null
echo
echo "=== stages ==="
printf '%s\n' "${SUMMARY[@]}"
echo
if [[ -s "$OUT/gpu_table.md" ]]; then
  cat "$OUT/gpu_table.md"
else
  echo "no benchmark table: see $LOGS/gpu_bench_*.log"
fi
exit "$FAILED"
