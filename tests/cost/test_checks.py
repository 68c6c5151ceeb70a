"""The cost models' shared argument checks: counts reject bools and floats, reals reject bools, NaN and (unless
asked) infinities; numpy scalars pass as plain Python numbers; every error names the argument and the value."""
import math
import re

import numpy as np
import pytest

from pytrain.cost import Link, get_cluster, plan, ring_allreduce
from pytrain.cost._checks import count, real


@pytest.mark.parametrize("value, minimum, maximum", [
    (True, 1, None), (False, 0, None), (2.0, 1, None), ("3", 1, None), (None, 1, None), (0, 1, None),
    (4, 0, 3), (np.float64(2.0), 1, None),
])
def test_count_rejects(value, minimum, maximum):
    with pytest.raises(ValueError, match=rf"^layers must be an int .*, got {re.escape(repr(value))}$"):
        count("layers", value, minimum, maximum)


def test_count_accepts_integers_and_returns_int():
    assert count("p", 3) == 3
    got = count("p", np.int64(3))
    assert got == 3 and type(got) is int
    assert count("zero_stage", 0, 0, 3) == 0


@pytest.mark.parametrize("value, kw", [
    (True, {}), (math.nan, {}), (math.inf, {}), (-math.inf, {"finite": False}), (math.nan, {"finite": False}),
    (-1e-300, {}), (0.0, {"strict": True}), (1.5, {"maximum": 1.0}), ("1", {}), (None, {}),
])
def test_real_rejects(value, kw):
    with pytest.raises(ValueError, match=r"^seconds must be .*, got "):
        real("seconds", value, **kw)


def test_real_accepts_numbers_and_returns_float():
    assert real("x", 0) == 0.0 and real("x", 1.0, maximum=1.0) == 1.0
    assert real("x", math.inf, strict=True, finite=False) == math.inf
    got = real("x", np.float32(0.5))
    assert got == 0.5 and type(got) is float


def test_numpy_counts_work_through_the_models():
    """A count read from a numpy array is a count, not an error (the models compute with plain ints)."""
    link = Link(1e-6, 1e-9)
    assert ring_allreduce(1e6, np.int64(4), link) == ring_allreduce(1e6, 4, link)
    cluster = get_cluster("8xH100-400G", np.int64(1))
    assert plan(1e9, np.int32(8), 1024, 512, 64, cluster)[0] == plan(1e9, 8, 1024, 512, 64, cluster)[0]
