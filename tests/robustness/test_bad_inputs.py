"""The bad-input suite: every case of the tables ``tests/robustness/cases_*.py`` is one test.

The cases run once per session, together (``pytrain.testing.robustness.run_cases``: isolated cases in worker
processes, one per family, two at a time); each test then checks its own case's outcome.  A failing test
prints what happened: a wrong error, a silent wrong answer, a crash, a hang or an out-of-memory.
``python -m tests.robustness.summary`` prints the table of outcomes.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pytrain.testing.robustness import load_table, run_cases

TABLES = sorted(Path(__file__).parent.glob("cases_*.py"))
CASES = [(table, case) for table in TABLES for case in load_table(table)]


@pytest.fixture(scope="session")
def outcomes(request):
    """Outcomes of the cases this session selected (all of them unless -k / ids narrow it)."""
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if item.originalname == "test_case" and hasattr(item, "callspec")}
    return run_cases([(t, c) for t, c in CASES if c.id in selected])


@pytest.mark.parametrize("case_id", [c.id for _, c in CASES])
def test_case(case_id, outcomes):
    result = outcomes[case_id]
    assert result.passed, result.describe()
