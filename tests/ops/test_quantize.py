"""The codec ops of the quantized all-reduce hook (pytrain/ops/quantize.py): ``quantize_into``, ``requantize_mean``
and ``dequantize_into`` on every CPU backend, bit for bit against the composition of today's ``quantize`` /
``dequantize`` ops that they fuse (codes, scales, residuals and outputs; NaN equal to NaN).

Covered: int8, fp8_e4m3, fp8_e5m2; float32 / bfloat16 / float16 inputs and outputs; odd sizes and partial last
groups; groups larger than one chunk / program (the two-phase paths); NaN / inf / zero / tiny groups in x, in the
residual and in the received rows; 1, 2 and 3 rows taken from a packed byte buffer (strided rows); residuals
shorter than a row or empty; bad input (clear errors, from the public functions and from the raw C++ ops).
"""
import math

import pytest
import torch

from pytrain.ops.quantize import (FORMATS, dequantize_groups, dequantize_into, num_groups, quantize_groups,
                                  quantize_into, requantize_mean)
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip

FMTS = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bytes(t):
    return t.view(torch.uint8)


def _same(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=what)


def _or_skip(op, impl, dtype=torch.float32):
    impl_or_skip(op, impl)
    if impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bfloat16 is not faithful")


def _gradient(n, dtype=torch.float32, seed=0):
    """Gradient-like values spanning several magnitudes, with a zero group, a tiny value and a huge one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-12, 4, (n,), generator=gen).float())
    x[: min(n, 9)] = 0.0
    if n > 40:
        x[20], x[33] = 1e-39, -3e4
    return x.to(dtype)


# ------------------------------------------------------------------------------------------ compositions
def composed_quantize_into(x, residual, fmt, group):
    """(codes, scales, residual after) from quantize / dequantize (reference backend)."""
    y = x if residual is None else x.float() + residual
    codes, scales = quantize_groups(y, fmt, group, impl="reference")
    if residual is None:
        return codes, scales, None
    return codes, scales, y - dequantize_groups(codes, scales, group, impl="reference")


def composed_requantize_mean(data, scales, residual, group):
    rows = data.shape[0]
    fmt = next(f for f, spec in FORMATS.items() if spec.dtype == data.dtype)
    a = dequantize_groups(data[0].contiguous(), scales[0].contiguous(), group, impl="reference")
    for w in range(1, rows):
        a = a + dequantize_groups(data[w].contiguous(), scales[w].contiguous(), group, impl="reference")
    a = a / rows
    codes, s = quantize_groups(a, fmt, group, impl="reference")
    if residual is None:
        return codes, s, None
    err = a - dequantize_groups(codes, s, group, impl="reference")
    return codes, s, residual + (err * rows)[: residual.numel()]


def packed_rows(rows, n, fmt, group, seed=0, pad=5):
    """(data (rows, n) codes, scales (rows, groups) float32): strided views of one uint8 buffer, each row its codes,
    ``pad`` spare bytes rounded to 4, then its scales; the rows are quantized gradients."""
    g = num_groups(n, group)
    at = -(-(n + pad) // 4) * 4
    buf = torch.full((rows, at + 4 * g), 0xA5, dtype=torch.uint8)
    data, scales = buf[:, :n].view(FORMATS[fmt].dtype), buf[:, at:].view(torch.float32)
    for w in range(rows):
        codes, s = quantize_groups(_gradient(n, seed=seed + w) * (w + 1), fmt, group, impl="reference")
        data[w].copy_(codes)
        scales[w].copy_(s)
    return data, scales


# ------------------------------------------------------------------------------------------ quantize_into
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedback", [False, True])
@pytest.mark.parametrize("n, group", [(1, 256), (1000, 256), (1003, 7), (4099, 4099)])
def test_quantize_into_matches_composition(impl, fmt, dtype, feedback, n, group):
    _or_skip("quantize_into", impl, dtype)
    x = _gradient(n, dtype)
    residual = _gradient(n, seed=1) * 1e-2 if feedback else None
    want = composed_quantize_into(x, residual, fmt, group)
    data = torch.full((n,), 0x5A, dtype=torch.uint8).view(FORMATS[fmt].dtype)
    scales = torch.full((num_groups(n, group),), math.nan)
    r = None if residual is None else residual.clone()
    quantize_into(x, r, data, scales, fmt, group, impl=impl)
    assert torch.equal(_bytes(data), _bytes(want[0])), f"{impl} {fmt} {dtype}: codes differ"
    _same(scales, want[1], "scales")
    if feedback:
        _same(r, want[2], "residual")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_into_large_groups(impl, fmt):
    """Groups longer than a chunk (CPU) / program (Triton): the two-phase path, with the residual added once."""
    _or_skip("quantize_into", impl)
    n = 70001 if impl != "triton" else 9001
    x, residual = _gradient(n), _gradient(n, seed=2) * 1e-3
    for group in (n, n // 2 + 3):
        want = composed_quantize_into(x, residual, fmt, group)
        data = torch.empty(n, dtype=FORMATS[fmt].dtype)
        scales, r = torch.empty(num_groups(n, group)), residual.clone()
        quantize_into(x, r, data, scales, fmt, group, impl=impl)
        assert torch.equal(_bytes(data), _bytes(want[0]))
        _same(scales, want[1], "scales")
        _same(r, want[2], "residual")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("where", ["x", "residual"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3e38])
def test_quantize_into_special_values(impl, fmt, where, value):
    """A NaN / inf (or an overflowing x + r) makes its group's scale NaN and its residual NaN; others unchanged."""
    _or_skip("quantize_into", impl)
    n, group = 700, 64
    x, residual = _gradient(n), _gradient(n, seed=3) * 1e-2
    (x if where == "x" else residual)[100] = value
    if value == 3e38:
        (residual if where == "x" else x)[100] = 3e38  # x + r = inf
    want = composed_quantize_into(x, residual, fmt, group)
    data, scales, r = torch.empty(n, dtype=FORMATS[fmt].dtype), torch.empty(num_groups(n, group)), residual.clone()
    quantize_into(x, r, data, scales, fmt, group, impl=impl)
    assert math.isnan(scales[100 // group]) and torch.isfinite(scales[:100 // group]).all()
    assert torch.equal(_bytes(data), _bytes(want[0]))
    _same(scales, want[1], "scales")
    _same(r, want[2], "residual")


# ------------------------------------------------------------------------------------------ requantize_mean
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n, group", [(1, 256), (768, 256), (1003, 7), (4099, 4099)])
@pytest.mark.parametrize("m", ["none", "empty", "part", "all"])
def test_requantize_mean_matches_composition(impl, fmt, rows, n, group, m):
    _or_skip("requantize_mean", impl)
    data, scales = packed_rows(rows, n, fmt, group)
    residual = None if m == "none" else _gradient({"empty": 0, "part": n // 2 + 1, "all": n}[m], seed=4) * 1e-2
    want = composed_requantize_mean(data, scales, residual, group)
    out_data = torch.full((n,), 0x5A, dtype=torch.uint8).view(data.dtype)
    out_scales = torch.full((num_groups(n, group),), math.nan)
    r = None if residual is None else residual.clone()
    requantize_mean(data, scales, out_data, out_scales, r, group, impl=impl)
    assert torch.equal(_bytes(out_data), _bytes(want[0])), f"{impl} {fmt} rows {rows}: codes differ"
    _same(out_scales, want[1], "scales")
    if r is not None:
        _same(r, want[2], "residual")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_requantize_mean_large_groups(impl, fmt):
    _or_skip("requantize_mean", impl)
    n = 70001 if impl != "triton" else 9001
    for group in (n, n // 2 + 3):
        data, scales = packed_rows(2, n, fmt, group)
        _check_requantize_mean(data, scales, _gradient(n - 5, seed=5) * 1e-3, group, impl)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, 3e38])
def test_requantize_mean_special_scales(impl, fmt, scale):
    """A NaN / inf received scale (a non-finite group on a rank) gives a NaN group; 0 scales a zero group;
    huge scales overflow the sum to inf (a NaN group)."""
    _or_skip("requantize_mean", impl)
    n, group = 700, 64
    data, scales = packed_rows(2, n, fmt, group)
    scales[1, 3] = scale
    if scale == 3e38:
        scales[0, 3] = scale
    _check_requantize_mean(data, scales, _gradient(n, seed=6) * 1e-2, group, impl)


def _check_requantize_mean(data, scales, residual, group, impl):
    """requantize_mean of the rows into fresh outputs, with residual updated in place, against the composition."""
    n = data.shape[1]
    want = composed_requantize_mean(data, scales, residual, group)
    out_data, out_scales = torch.empty(n, dtype=data.dtype), torch.empty(num_groups(n, group))
    requantize_mean(data, scales, out_data, out_scales, residual, group, impl=impl)
    assert torch.equal(_bytes(out_data), _bytes(want[0]))
    _same(out_scales, want[1], "scales")
    _same(residual, want[2], "residual")


# ------------------------------------------------------------------------------------------ dequantize_into
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, group", [(1, 256), (1003, 7), (70001, 256)])
def test_dequantize_into_matches_dequantize(impl, fmt, dtype, n, group):
    _or_skip("dequantize_into", impl, dtype)
    data, scales = packed_rows(1, n, fmt, group)
    scales[0, 0] = math.nan
    out = torch.full((n,), 7.0, dtype=dtype)
    dequantize_into(data[0], scales[0], group, out, impl=impl)
    _same(out, dequantize_groups(data[0].contiguous(), scales[0].contiguous(), group, dtype, impl="reference"), "out")


# ------------------------------------------------------------------------------------------ bad input
def _q_args(n=100, group=32, fmt="int8"):
    return dict(x=torch.randn(n), residual=torch.zeros(n), data=torch.empty(n, dtype=FORMATS[fmt].dtype),
                scales=torch.empty(num_groups(n, group)), fmt=fmt, group_size=group)


def _m_args(n=100, group=32, rows=2):
    data, scales = packed_rows(rows, n, "int8", group)
    return dict(data=data, scales=scales, out_data=torch.empty(n, dtype=torch.int8),
                out_scales=torch.empty(num_groups(n, group)), residual=torch.zeros(n), group_size=group)


def _d_args(n=100, group=32):
    data, scales = packed_rows(1, n, "int8", group)
    return dict(data=data[0], scales=scales[0], group_size=group, out=torch.empty(n))


BAD = {
    "quantize_into": (_q_args, [
        (dict(fmt="int4"), ValueError, "format"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(x=torch.randn(100).to(torch.int32)), TypeError, "dtype"),
        (dict(x=torch.randn(100, dtype=torch.float64)), TypeError, "float64"),
        (dict(x=torch.randn(200)[::2]), ValueError, "contiguous"),
        (dict(residual=torch.zeros(99)), ValueError, "residual"),
        (dict(residual=torch.zeros(100, dtype=torch.bfloat16)), TypeError, "residual"),
        (dict(residual=torch.zeros(200)[::2]), ValueError, "residual"),
        (dict(data=torch.empty(100, dtype=torch.float8_e4m3fn)), TypeError, "data"),
        (dict(data=torch.empty(101, dtype=torch.int8)), ValueError, "data"),
        (dict(scales=torch.empty(3)), ValueError, "scales"),
        (dict(scales=torch.empty(4, dtype=torch.float64)), TypeError, "scales"),
    ]),
    "requantize_mean": (_m_args, [
        (dict(group_size=-1), ValueError, "group_size"),
        (dict(data=torch.zeros(2, 100)), TypeError, "data"),
        (dict(data=torch.zeros(200, dtype=torch.int8)), ValueError, "data"),
        (dict(data=torch.zeros(100, 2, dtype=torch.int8).t()), ValueError, "data"),
        (dict(data=torch.zeros(0, 100, dtype=torch.int8)), ValueError, "data"),
        (dict(scales=torch.zeros(2, 3)), ValueError, "scales"),
        (dict(scales=torch.zeros(3, 4)), ValueError, "scales"),
        (dict(scales=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "scales"),
        (dict(out_data=torch.empty(100, dtype=torch.float8_e5m2)), TypeError, "out_data"),
        (dict(out_data=torch.empty(99, dtype=torch.int8)), ValueError, "out_data"),
        (dict(out_scales=torch.empty(5)), ValueError, "out_scales"),
        (dict(residual=torch.zeros(101)), ValueError, "residual"),
        (dict(residual=torch.zeros(100, dtype=torch.float16)), TypeError, "residual"),
    ]),
    "dequantize_into": (_d_args, [
        (dict(group_size=0), ValueError, "group_size"),
        (dict(data=torch.zeros(100)), TypeError, "data"),
        (dict(scales=torch.zeros(5)), ValueError, "scales"),
        (dict(out=torch.empty(99)), ValueError, "out"),
        (dict(out=torch.empty(100, dtype=torch.int32)), TypeError, "dtype"),
        (dict(out=torch.empty(200)[::2]), ValueError, "contiguous"),
    ]),
}
CASES = [(op, i) for op, (_, cases) in BAD.items() for i in range(len(cases))]
PUBLIC = {"quantize_into": quantize_into, "requantize_mean": requantize_mean, "dequantize_into": dequantize_into}


@pytest.mark.parametrize("op, case", CASES)
def test_bad_input_raises_clear_error(op, case):
    make, cases = BAD[op]
    change, kind, words = cases[case]
    with pytest.raises(kind, match=f"{op}: .*{words}"):
        PUBLIC[op](**{**make(), **change})


@pytest.mark.parametrize("op, case", CASES)
def test_cpu_kernel_checks_its_input(op, case):
    """The raw C++ op (torch.ops.pytrain.<op>, no Python contract in front) refuses the same input."""
    impl_or_skip(op, "cpu")
    make, cases = BAD[op]
    change = cases[case][0]
    with pytest.raises(RuntimeError, match=op.split("_into")[0]):
        getattr(torch.ops.pytrain, op)(**{**make(), **change})
