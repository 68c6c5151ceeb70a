"""Result records (pytrain.cost.report): readable reprs, and the dict interface old callers index by key."""
import pickle

import pytest

from pytrain.cost import BubbleReport, bubble_fraction

FIELDS = dict(schedule="1f1b", stages=2, virtual_stages=1, microbatches=4, measured=0.231, predicted=0.2,
              per_rank=[0.2, 0.262], imbalance=1.054, step_s=0.0123, predicted_step_s=0.011)


def test_bubble_report_repr_is_one_readable_line():
    text = repr(BubbleReport(**FIELDS))
    assert text == ("BubbleReport(1f1b, 2 stages, 4 micro-batches: bubble 23.1% measured vs 20.0% predicted, "
                    "step 12.3 ms vs 11 ms predicted, imbalance 1.05)")
    interleaved = repr(BubbleReport(**{**FIELDS, "schedule": "interleaved", "virtual_stages": 2}))
    assert "2 stages x 2 chunks" in interleaved and str(BubbleReport(**FIELDS)) == text


def test_bubble_report_reads_like_the_dict_it_replaces():
    """PipelineTrainer.bubble_report's callers (tests/trainers/test_pipeline.py, bench/bench_pipeline.py)
    index it by key and compare reports across ranks."""
    report = BubbleReport(**FIELDS)
    assert report["stages"] == report.stages == 2 and report["per_rank"] == [0.2, 0.262]
    assert dict(report) == FIELDS and report == FIELDS and report == BubbleReport(**FIELDS)
    assert report != BubbleReport(**{**FIELDS, "measured": 0.3})
    assert list(report) == list(FIELDS) and len(report) == len(FIELDS) and "measured" in report
    assert report.get("nothing") is None
    with pytest.raises(KeyError, match="nothing"):
        report["nothing"]
    assert pickle.loads(pickle.dumps(report)) == report  # crosses process boundaries (spawn results)


def test_bubble_report_is_frozen():
    report = BubbleReport(**{**FIELDS, "predicted": bubble_fraction(2, 4, "1f1b")})
    with pytest.raises(AttributeError):
        report.measured = 0.0
