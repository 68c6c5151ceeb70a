"""Pipeline bubble, in-flight activations, p2p bytes, balance and step time: hand-computed values and limits."""
import pytest

from pytrain.cost import bubble_fraction, inflight_microbatches, load_balance, p2p_bytes, pipeline_step


def test_bubble_hand_computed():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)  # (p-1)/(m+p-1)
    assert bubble_fraction(4, 8, "1f1b") == bubble_fraction(4, 8, "gpipe")  # 1F1B saves memory, not bubble
    assert bubble_fraction(4, 8, relative_to="ideal") == pytest.approx(3 / 8)  # (p-1)/m
    assert bubble_fraction(4, 8, "interleaved", 2, relative_to="ideal") == pytest.approx(3 / 16)  # (p-1)/(v m)
    assert bubble_fraction(4, 8, "interleaved", 2) == pytest.approx(3 / 19)
    assert bubble_fraction(8, 1) == pytest.approx(7 / 8)  # one micro-batch: only one stage busy at a time


def test_bubble_limits():
    assert bubble_fraction(1, 5) == 0  # one stage has no bubble
    assert bubble_fraction(4, 10**6) == pytest.approx(0, abs=1e-5)
    values = [bubble_fraction(4, m) for m in (4, 8, 16, 32)]
    assert values == sorted(values, reverse=True)  # more micro-batches, smaller bubble
    assert bubble_fraction(4, 8, "interleaved", 4) < bubble_fraction(4, 8, "interleaved", 2) < bubble_fraction(4, 8)


def test_inflight_and_p2p():
    assert inflight_microbatches(4, 16, "gpipe") == 16
    assert inflight_microbatches(4, 16, "1f1b") == 4
    assert inflight_microbatches(4, 16, "interleaved", 2) == pytest.approx(4 * (1 + 3 / 8))
    assert p2p_bytes(2048, 4, 4096, 2) == 2048 * 4 * 4096 * 2


def test_balance_and_step():
    assert load_balance([1, 1, 1, 1]) == 1
    assert load_balance([1, 1, 1, 2]) == pytest.approx(2 / 1.25)
    assert pipeline_step([1.0] * 4, 8) == pytest.approx(11.0)  # (m + p - 1) slots
    assert pipeline_step([1.0, 2.0], 4) == pytest.approx(5 * 2.0)  # the slowest stage sets the pace
    assert pipeline_step([1.0] * 4, 8, "interleaved", 2) == pytest.approx(8 + 1.5)
    assert pipeline_step([1.0] * 2, 4, p2p_s=0.25) == pytest.approx(5 * 1.5)
    # step time and bubble agree: idle share of the step = bubble fraction
    assert 1 - 8 * 1.0 / pipeline_step([1.0] * 4, 8) == pytest.approx(bubble_fraction(4, 8))


@pytest.mark.parametrize("call, match", [
    (lambda: bubble_fraction(0, 4), "stages"),
    (lambda: bubble_fraction(4, 0), "microbatches"),
    (lambda: bubble_fraction(4, 8, "zb"), "schedule"),
    (lambda: bubble_fraction(4, 8, "gpipe", 2), "interleaved"),
    (lambda: bubble_fraction(4, 2, "1f1b"), "at least as many micro-batches"),
    (lambda: bubble_fraction(4, 8, relative_to="step"), "relative_to"),
    (lambda: load_balance([]), "non-empty"),
    (lambda: load_balance([1, -1]), ">= 0"),
    (lambda: p2p_bytes(0, 1, 8), "seq"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
