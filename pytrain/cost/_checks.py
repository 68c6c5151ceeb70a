"""Argument checks shared by every cost model: counts and real numbers, each failure a ValueError naming the
argument and the value.

* ``count``: an integer (Python or numpy), never a bool (``True`` is an int to Python, but not a count of
  processes, layers or nodes), and never a float, even a whole one (``8.0`` micro-batches is a caller's slip).
* ``real``: a real number, never a bool, never NaN, finite unless asked otherwise, above a lower bound and
  at most an upper one.  NaN fails every comparison, so a check written as ``if value < 0: raise`` lets
  it through; these checks test what is allowed instead.

Both return the value as a plain ``int`` / ``float`` for callers that compute with it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional


def count(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` as an int, after checking it is an integer (not a bool) in ``[minimum, maximum]``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def real(name: str, value, minimum: float = 0.0, *, strict: bool = False, maximum: Optional[float] = None,
         finite: bool = True, unit: str = "") -> float:
    """``value`` as a float, after checking it is a real number (not a bool, not NaN), finite unless
    ``finite=False``, ``> minimum`` (``strict``) or ``>= minimum``, and ``<= maximum`` when given."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
          and (math.isfinite(value) or not finite)
          and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum))
    if not ok:
        bounds = f"{'>' if strict else '>='} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind} {bounds}{' ' + unit if unit else ''}, got {value!r}")
    return float(value)
