"""The CPU multi-tensor kernels give the same bits whatever the OpenMP team size: each case runs in fresh
processes with OMP_NUM_THREADS=1 and 2 and the SHA-256 of all outputs must
agree.  Why they do (csrc/cpu/multi_tensor.h): chunk boundaries are fixed (64K elements, whole int8 blocks),
each chunk is reduced alone in a fixed order, and the per-chunk partials of a tensor (or of the whole list,
for global_norm) are added in chunk order by one thread; the team size only decides which thread runs
which chunks."""
from pytrain.testing.multi_tensor import DETERMINISM_CASES, backend_device, digests_with_threads


def test_cpu_kernels_bit_identical_across_omp_team_sizes():
    for op, _ in DETERMINISM_CASES.values():
        backend_device(op, "cpu")
    cases = list(DETERMINISM_CASES)
    runs = {threads: digests_with_threads(cases, threads) for threads in (1, 2)}
    differ = [c for c in cases if runs[2][c] != runs[1][c]]
    assert not differ, f"OMP_NUM_THREADS=2 changes the bits of {differ} (against 1)"

