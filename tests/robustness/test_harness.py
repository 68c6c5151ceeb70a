"""The bad-input harness itself (``pytrain.testing.robustness``): each outcome it reports, crashes, hangs and
out-of-memory included, is recognised, and the cases after a dead worker still run."""
from __future__ import annotations

from pathlib import Path

from pytrain.testing.robustness import OUTCOMES, format_summary, load_table, run_cases

TABLE = Path(__file__).parent / "harness_table.py"


def test_every_outcome_is_recognised():
    import importlib.util

    spec = importlib.util.spec_from_file_location("harness_table_expected", TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = load_table(TABLE)
    results = run_cases([(TABLE, c) for c in cases], workers=1, case_timeout=3.0)
    got = {r.id.split("::")[1]: r.outcome for r in results.values()}
    want = {name: outcome for name, (outcome, _, _) in module.EXPECTED.items()}
    want["local"] = "correct"
    assert got == want, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert "SIGSEGV" in results["harness::segfault"].detail
    table = format_summary(list(results.values()))
    assert table.splitlines()[0] == "| family | tried | " + " | ".join(OUTCOMES) + " |"
    assert "| **total** | 16 |" in table
