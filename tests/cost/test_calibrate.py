"""calibrate on a real gloo group (2 processes): the fitted alpha-beta link predicts other message sizes.

The timing runs in one spawn (process start-up is slow on 2 cores).  The held-out sizes are timed in the
same rounds as the fitted ones (``validate_sizes``): on a shared 2-core machine the load changes within
seconds, and a calibration timed before the held-out sizes would compare two different machines.
Sizes stay within 8 KiB .. 2 MiB: beyond the last-level cache gloo's reduction slows down (a knee the
linear alpha-beta model does not have), so calibration sizes should span the sizes one predicts.
"""
import math
import statistics

import pytest
import torch

from pytrain.cost import Calibration, Link, calibrate, fit_link
from pytrain.trainers.launch import spawn

CALIBRATION_SIZES = (8 * 2**10, 256 * 2**10, 2 * 2**20)
HELD_OUT_SIZES = (32 * 2**10, 128 * 2**10, 512 * 2**10, 2**20)
REPEATS = 100
FACTOR = 3.0  # prediction / measurement, both ways


def _calibrate_worker():
    torch.set_num_threads(1)  # 2 processes on 2 cores: gloo's threads need the rest
    others = {op: calibrate(sizes=(2**14, 2**20), repeats=5, warmup=1, op=op)
              for op in ("reduce_scatter", "all_gather", "all_to_all")}
    return calibrate(sizes=CALIBRATION_SIZES, repeats=REPEATS, validate_sizes=HELD_OUT_SIZES), others


@pytest.fixture(scope="module")
def calibrated():
    return spawn(_calibrate_worker, 2)


def _within_factor(cal):
    errors = cal.relative_errors(held_out=True)
    report = ", ".join(f"{n // 1024} KiB: {e:+.0%}" for n, e in errors.items())
    return all(1 / FACTOR <= 1 + e <= FACTOR for e in errors.values()), f"prediction errors {report} ({cal.link})"


def test_predicts_held_out_sizes(calibrated):
    """The fit on a real group predicts the held-out sizes to within a factor of FACTOR.

    Not the model's accuracy: on the 2-core CI machines (an Intel Xeon VM, idle) one run's held-out errors
    ranged from +22% to -59% and the next run's differed by 60 points at the same size: loopback gloo
    timings at these sizes are that noisy.  The accuracy is measured and reported by bench/bench_cost.py
    (the DDP step time predicted from this calibration against the measured one); this test catches a
    calibration that is broken (wrong units, sizes or world-size factors make errors
    of 4x and more), and the fit itself is checked exactly by test_fit_recovers_a_known_link."""
    (cal, _), (cal1, _) = calibrated
    assert cal == cal1, "ranks must agree on the calibration"
    assert cal.link.alpha > 0 and cal.link.beta > 0
    assert sorted(cal.validation) == sorted(HELD_OUT_SIZES) and sorted(cal.measured) == sorted(CALIBRATION_SIZES)
    ok, report = _within_factor(cal)
    if not ok:  # a burst of load can bend one run: an independent second calibration must then hold
        (again, _), _ = spawn(_calibrate_worker, 2)
        ok, second = _within_factor(again)
        report = f"first run: {report}; second run: {second}"
    assert ok, report


def test_other_collectives(calibrated):
    (_, others), (_, others1) = calibrated
    assert others == others1
    for op, cal in others.items():
        assert cal.op == op and cal.world_size == 2 and sorted(cal.measured) == [2**14, 2**20]
        assert all(t > 0 for t in cal.measured.values()) and cal.predict(2**20) > 0


def test_fit_recovers_a_known_link():
    link = Link(alpha=50e-6, beta=1e-9)
    sizes = [2**k for k in range(10, 24, 3)]
    times = [2 * (link.alpha + n * link.beta / 2) for n in sizes]
    times[1] *= 5  # one wild outlier: Huber's loss keeps it from dragging the line
    fitted = fit_link(sizes, times, p=2).link
    assert fitted.alpha == pytest.approx(link.alpha, rel=0.05)
    assert fitted.beta == pytest.approx(link.beta, rel=0.05)


def test_fit_clamps_to_nonnegative():
    sizes = [1000, 2000, 4000]
    fitted = fit_link(sizes, [1e-3, 0.9e-3, 0.8e-3], p=2).link  # time falling with size: no bandwidth term
    assert fitted.beta == 0 and fitted.alpha == pytest.approx(statistics.mean([1e-3, 0.9e-3, 0.8e-3]) / 2, rel=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=[1000], seconds=[1e-3], p=2), "at least 2"),
    (dict(sizes=[1000, 1000], seconds=[1e-3, 1e-3], p=2), "distinct"),
    (dict(sizes=[1000, 2000], seconds=[1e-3, 0.0], p=2), "> 0"),
    (dict(sizes=[1000, 2000], seconds=[1e-3, math.inf], p=2), r"seconds\[1\] must be a finite number"),
    (dict(sizes=[1000, 2000], seconds=[math.nan, 2e-3], p=2), r"seconds\[0\]"),
    (dict(sizes=[1000, math.nan], seconds=[1e-3, 2e-3], p=2), r"sizes\[1\]"),
    (dict(sizes=[1000, 2000], seconds=[1e-3, 2e-3], p=True), "p must be an int"),
    (dict(sizes=[1000, 2000], seconds=[1e-3, 2e-3], p=1), ">= 2 ranks"),
    (dict(sizes=[1000, 2000], seconds=[1e-3, 2e-3], p=2, op="gather"), "unknown collective"),
])
def test_fit_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_link(**kwargs)


def test_calibrate_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        calibrate(sizes=CALIBRATION_SIZES)


def test_calibration_repr_is_one_line():
    cal = Calibration(Link(1e-4, 1 / 2e9), "all_reduce", 2, {2**16: 1e-3, 2**20: 2e-3}, {2**21: 3e-3})
    assert repr(cal) == ("Calibration(all_reduce on 2 ranks: Link(alpha 100 us, 2 GB/s); fitted on 0.0625, 1 MiB; "
                         "1 held-out sizes)")
