"""Cases with known outcomes for ``test_harness.py``: one of each outcome the harness tells apart (a crash by
signal, a hang and an out-of-memory among them), and cases after them that must still run."""
from __future__ import annotations

import ctypes
import math

from pytrain.testing.robustness import Case, Correct, Either, Raises


def _raise(error):
    def run():
        raise error
    return run


def _hang():
    while True:
        pass


def _allocate():
    import torch
    return torch.ones(8 << 30, dtype=torch.uint8)  # 8 GiB: beyond the worker's memory cap


EXPECTED = {
    "clear_error": ("clear error", _raise(ValueError("x must be >= 0, got -1")), Raises(ValueError, "x must")),
    "error_or_result": ("clear error", _raise(ValueError("x is not contiguous")),
                        Either(Raises(ValueError, "contiguous"))),
    "correct": ("correct", lambda: ([1.0, math.nan], [1.0 + 1e-9, math.nan]), Correct(1e-6, 0)),
    "wrong_type": ("wrong error", _raise(KeyError("x")), Raises(ValueError, "x")),
    "wrong_message": ("wrong error", _raise(ValueError("bad input")), Raises(ValueError, "names x")),
    "error_not_result": ("wrong error", _raise(ValueError("x")), Correct()),
    "accepted": ("silent wrong", lambda: 3, Raises(ValueError, "x")),
    "wrong_result": ("silent wrong", lambda: (1.0, 2.0), Correct()),
    "wrong_shape": ("silent wrong", lambda: ([1.0], [1.0, 2.0]), Correct()),
    "segfault": ("crash", lambda: ctypes.string_at(0), Correct()),
    "after_segfault": ("correct", lambda: (1, 1), Correct()),
    "hang": ("hang", _hang, Correct()),
    "after_hang": ("clear error", _raise(ValueError("x")), Raises(ValueError, "x")),
    "oom": ("oom", _allocate, Correct()),
    "after_oom": ("correct", lambda: (2, 2), Correct()),
}


def cases():
    out = [Case("harness", name, run, expect) for name, (_, run, expect) in EXPECTED.items()]
    out.append(Case("harness", "local", lambda: (0, 0), Correct(), isolate=False))
    return out
