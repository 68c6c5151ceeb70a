"""pytrain.quant: every backend's codes, scales and dequantized values against the reference in pytrain/ops/quantize.py (bit for bit), fp8
casts against torch's, round-trip SQNR, special values, unbiased stochastic rounding, bad input, opcheck."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytrain.ops.quantize import dequantize_groups, quantize_groups
from pytrain.quant import FORMATS, QTensor, dequantize, quantize
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip
from pytrain.testing.tolerances import QUANT_SQNR_DB

FMTS = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRANULARITIES = {"tensor": {}, "block7": dict(block_size=7), "block256": dict(block_size=256), "rows": dict(axis=0),
                 "columns": dict(axis=-1)}


def _impl_dtype_or_skip(impl, dtype):
    impl_or_skip("quantize", impl)
    if impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bfloat16 is not faithful")


def _bytes(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same_qtensor(actual: QTensor, expected: QTensor, msg=""):
    """Codes and scales bit for bit (NaN scales equal): the contract fixes every rounding."""
    assert torch.equal(_bytes(actual.data), _bytes(expected.data)), f"{msg}: codes differ"
    torch.testing.assert_close(actual.scales, expected.scales, rtol=0, atol=0, equal_nan=True, msg=msg)


def _sqnr_db(x, y):
    return 10 * math.log10(float(x.double().pow(2).sum() / (x.double() - y.double()).pow(2).sum()))


# ------------------------------------------------------------------------------------ backends vs reference
@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("gran", GRANULARITIES)
def test_backend_matches_reference(impl, dtype, fmt, gran):
    _impl_dtype_or_skip(impl, dtype)
    x = (torch.randn(37, 29) * 3).to(dtype)
    x[3, :5] = 0.0  # a zero run (a whole block7 group)
    actual = quantize(x, fmt, impl=impl, **GRANULARITIES[gran])
    expected = quantize(x, fmt, impl="reference", **GRANULARITIES[gran])
    assert_same_qtensor(actual, expected, f"{impl} {fmt} {gran} {dtype}")
    for out_dtype in (torch.float32, dtype):
        got = dequantize(actual, out_dtype, impl=impl)
        assert got.shape == x.shape and got.dtype == out_dtype
        assert torch.equal(got, dequantize(expected, out_dtype, impl="reference"))


@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "reference"])
@pytest.mark.parametrize("fmt", FMTS)
def test_large_groups_match_reference(impl, fmt):
    """Per-tensor scales over more elements than one chunk / program: the two-phase path."""
    impl_or_skip("quantize", impl)
    n = 70001 if impl == "cpu" else 9001
    x = torch.randn(n) * 5
    x[n // 2] = -40.0  # the absmax sits in a later piece
    assert_same_qtensor(quantize(x, fmt, impl=impl), quantize(x, fmt, impl="reference"), f"{impl} {fmt}")
    for group in (5000, n):  # a partial last group of several pieces
        got = quantize_groups(x, fmt, group, impl=impl)
        want = quantize_groups(x, fmt, group, impl="reference")
        assert torch.equal(_bytes(got[0]), _bytes(want[0])) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("impl", [i for i in CPU_IMPLS if i != "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_codes_match_reference(impl, dtype):
    _impl_dtype_or_skip(impl, dtype)
    x = (torch.randn(1031) * 2).to(dtype)
    for seed in (0, 12345678901, 2**63 - 1):  # the high 32 bits of the seed count too
        actual = quantize(x, "int8", block_size=256, stochastic=True, seed=seed, impl=impl)
        expected = quantize(x, "int8", block_size=256, stochastic=True, seed=seed, impl="reference")
        assert_same_qtensor(actual, expected, f"{impl} seed {seed}")


# ----------------------------------------------------------------------------------------- fp8 casts
def _fp8_probe_values(fmt):
    """Every finite positive code's value, the midpoints between neighbours (ties), the midpoints
    +- 1 fp32 ulp, values below the smallest subnormal, with both signs and qmax (so that inv == 1)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FORMATS[fmt].dtype).float()
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), grid[1:2] / 3])
    values = torch.cat([grid, near, torch.rand(2000) * FORMATS[fmt].qmax])
    return torch.cat([values, -values])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cast_matches_torch(impl, fmt):
    impl_or_skip("quantize", impl)
    x = _fp8_probe_values(fmt)
    qt = quantize(x, fmt, impl=impl)
    assert float(qt.scales) == 1.0
    assert torch.equal(_bytes(qt.data), _bytes(x.to(FORMATS[fmt].dtype)))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_every_code(impl, fmt):
    """All 256 codes (fp8 NaN / inf included) decode as torch's own cast, times the scale."""
    impl_or_skip("dequantize", impl)
    data = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FORMATS[fmt].dtype)
    scales = torch.tensor([1.0, 0.375])
    out = dequantize_groups(data, scales, 128, impl=impl)
    expected = data.float() * scales.repeat_interleave(128)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------ SQNR
def _sample(dist: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    if dist == "gaussian":
        return torch.randn(256, 256, generator=g)
    z = torch.randn(256, 256, generator=g)
    chi2 = torch.randn(3, 256, 256, generator=g).pow(2).sum(0)
    return z / (chi2 / 3).sqrt()  # Student-t, 3 degrees of freedom


QUANT_KW = {"tensor": {}, "block256": dict(block_size=256), "row": dict(axis=0),
            "stochastic": dict(block_size=256, stochastic=True, seed=7)}


@pytest.mark.parametrize("key", list(QUANT_SQNR_DB))
def test_round_trip_sqnr(key):
    fmt, gran, dist = key
    x = _sample(dist)
    sqnr = _sqnr_db(x, dequantize(quantize(x, fmt, **QUANT_KW[gran])))
    assert sqnr >= QUANT_SQNR_DB[key], f"{key}: SQNR {sqnr:.2f} dB < {QUANT_SQNR_DB[key]} dB"


def test_finer_scales_help_heavy_tails():
    x = _sample("student_t3")
    per_tensor, per_block = (_sqnr_db(x, dequantize(quantize(x, "int8", **kw))) for kw in ({}, dict(block_size=256)))
    assert per_block > per_tensor + 10


MEMORY_CAPPED_REFERENCE = """
import resource, sys, torch
from pytrain.ops.quantize import dequantize_reference, quantize_reference
resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, resource.RLIM_INFINITY))  # 1 GiB more heap at most
x = torch.randn(1000)
codes, scales = quantize_reference(x, "int8", 2**31 - 1, False, 0)
out = dequantize_reference(codes, scales, 2**31 - 1, torch.float32)
assert scales.shape == (1,) and float((out - x).abs().max()) <= float(scales[0]) / 2 + 1e-7
"""


def test_reference_memory_follows_the_tensor_not_the_group_size():
    """1,000 elements in one group of 2^31 - 1: the reference once padded to the group size (8.6 GB)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", MEMORY_CAPPED_REFERENCE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------- special values
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_zero_and_tiny_groups_dequantize_to_zero(impl, fmt):
    impl_or_skip("quantize", impl)
    x = torch.randn(4, 8)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = torch.tensor([1e-39, -3e-40, 1e-45, 0, 0, 0, 0, 0])  # float32 subnormals: below qmax * 2^-126
    qt = quantize(x, fmt, axis=0, impl=impl)
    assert qt.scales[:3].tolist() == [0.0, 0.0, 0.0] and bool((qt.scales[3] > 0).item())
    assert not _bytes(qt.data[:3]).any()
    out = dequantize(qt, impl=impl)
    assert torch.equal(out[:3], torch.zeros(3, 8))
    assert float((out[3] - x[3]).abs().max()) <= float(qt.scales[3]) * FORMATS[fmt].qmax * 2**-3


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_subnormal_inputs_keep_their_relative_precision(impl, fmt):
    """float16 subnormals (and float32 values near 1e-30) are normal numbers in the float32 maths."""
    impl_or_skip("quantize", impl)
    for x in (torch.randn(512).to(torch.float16) * 2.0**-18, torch.randn(512) * 1e-30):
        assert x.abs().max() > 0
        sqnr = _sqnr_db(x.float(), dequantize(quantize(x, fmt, block_size=256, impl=impl)))
        assert sqnr >= QUANT_SQNR_DB[(fmt, "block256", "gaussian")] - 2


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_groups_dequantize_to_nan(impl, fmt, bad):
    impl_or_skip("quantize", impl)
    x = torch.randn(3, 64)
    x[1, 10] = bad
    qt = quantize(x, fmt, block_size=64, impl=impl)
    assert math.isnan(float(qt.scales[1])) and bool(torch.isfinite(qt.scales[[0, 2]]).all())
    out = dequantize(qt, impl=impl)
    assert bool(out[1].isnan().all()), "a NaN / inf must never come back finite"
    assert bool(torch.isfinite(out[[0, 2]]).all())
    assert bool(dequantize(quantize(x, fmt, impl=impl)).isnan().all())  # per tensor: everything


# ---------------------------------------------------------------------------------- stochastic rounding
def test_stochastic_rounding_is_unbiased():
    """2048 draws of the same 256 values (one block each, so one scale): the mean error of every value
    must be within 5 standard errors of 0 (a ~1e-4 false-alarm rate); round-to-nearest must fail it."""
    draws = 2048
    base = torch.linspace(-1, 1, 256)
    base[0] = -1.0  # absmax 1: y = x * 127 has every fractional part
    x = base.repeat(draws)
    qt = quantize(x, "int8", block_size=256, stochastic=True, seed=99)
    assert bool((qt.scales == qt.scales[0]).all())
    y = base * 127
    frac = y - y.floor()
    stderr = (frac * (1 - frac) / draws).sqrt().clamp_min(1e-6)
    for codes, unbiased in ((qt.data, True), (quantize(x, "int8", block_size=256).data, False)):
        mean_err = (codes.view(draws, 256).double().mean(0) - y).abs()
        within = bool((mean_err <= 5 * stderr + 1e-9).all())
        assert within == unbiased, f"max |mean error| / stderr = {float((mean_err / stderr).max()):.1f}"


def test_stochastic_seeds():
    x = torch.randn(4096)
    a, b, c = (quantize(x, "int8", block_size=256, stochastic=True, seed=s).data for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.int() - quantize(x, "int8", block_size=256).data.int()).abs().max() <= 1
    torch.manual_seed(5)
    d = quantize(x, "int8", block_size=256, stochastic=True).data
    torch.manual_seed(5)
    assert torch.equal(d, quantize(x, "int8", block_size=256, stochastic=True).data)


# ------------------------------------------------------------------------------------- QTensor and API
def test_qtensor_rebuilt_from_bytes():
    """What a receiver does: codes as flat uint8 bytes plus the scales -> the same QTensor."""
    x = torch.randn(6, 50, dtype=torch.bfloat16)
    for fmt in FMTS:
        qt = quantize(x, fmt, block_size=64)
        wire = qt.data.view(torch.uint8).reshape(-1).clone()
        rebuilt = QTensor(wire, qt.scales.clone(), fmt, block_size=64, shape=x.shape, dtype=x.dtype)
        assert rebuilt.data.dtype == FORMATS[fmt].dtype and rebuilt.shape == x.shape
        assert torch.equal(dequantize(rebuilt, None), dequantize(qt, None))
        assert dequantize(rebuilt, None).dtype == torch.bfloat16
        assert qt.nbytes == 300 + 4 * 5 == rebuilt.nbytes


@pytest.mark.parametrize("kwargs, error", [
    (dict(data=torch.zeros(10, dtype=torch.int16)), TypeError),
    (dict(scales=torch.zeros(2)), ValueError),
    (dict(scales=torch.zeros(1, dtype=torch.float64)), ValueError),
    (dict(fmt="int4"), ValueError),
    (dict(shape=(3, 3)), ValueError),
    (dict(axis=1), ValueError),
    (dict(dtype=torch.int32), TypeError),
])
def test_qtensor_validates(kwargs, error):
    args = dict(data=torch.zeros(10, dtype=torch.int8), scales=torch.zeros(1), fmt="int8")
    with pytest.raises(error):
        QTensor(**{**args, **kwargs})


def test_per_axis_layouts():
    x = torch.randn(3, 4, 5)
    for axis in range(3):
        qt = quantize(x, "int8", axis=axis)
        assert qt.scales.shape == (x.shape[axis],) and qt.data.shape == x.shape and qt.data.is_contiguous()
        amax = x.abs().amax(dim=[d for d in range(3) if d != axis])
        torch.testing.assert_close(qt.scales, amax / 127)


def test_non_contiguous_and_scalar_inputs():
    x = torch.randn(40, 30).t()
    assert torch.equal(quantize(x, "fp8_e4m3", block_size=16).data, quantize(x.contiguous(), "fp8_e4m3", block_size=16).data)
    qt = quantize(torch.tensor(-2.5), "int8")
    assert qt.data.shape == () and float(dequantize(qt)) == -2.5


@pytest.mark.parametrize("shape, kwargs, scales", [((0,), {}, 1), ((0, 4), dict(block_size=3), 0),
                                                   ((2, 0), dict(axis=0), 2), ((0, 3), dict(axis=1), 3)])
def test_empty_tensors(shape, kwargs, scales):
    qt = quantize(torch.empty(shape), "int8", **kwargs)
    assert qt.data.shape == shape and qt.scales.shape == (scales,) and not qt.scales.any()
    assert dequantize(qt).shape == shape


@pytest.mark.parametrize("call, error, match", [
    (lambda x: quantize(x, "int3"), ValueError, "unknown format"),
    (lambda x: quantize(x, "int8", block_size=0), ValueError, "block_size"),
    (lambda x: quantize(x, "int8", block_size=-4), ValueError, "block_size"),
    (lambda x: quantize(x, "int8", block_size=2.5), ValueError, "block_size"),
    (lambda x: quantize(x, "int8", axis=2), ValueError, "axis"),
    (lambda x: quantize(x, "int8", axis=-3), ValueError, "axis"),
    (lambda x: quantize(x, "int8", axis=0, block_size=4), ValueError, "not both"),
    (lambda x: quantize(x.int(), "int8"), TypeError, "dtype"),
    (lambda x: quantize(x.to(torch.complex64), "int8"), TypeError, "dtype"),
    (lambda x: quantize(x, "fp8_e4m3", stochastic=True), ValueError, "int8 only"),
    (lambda x: quantize(x, "int8", stochastic=True, seed=-1), ValueError, "seed"),
    (lambda x: quantize(x.numpy(), "int8"), TypeError, "tensor"),
    (lambda x: dequantize(quantize(x, "int8"), torch.int32), TypeError, "dtype"),
    (lambda x: dequantize(x), TypeError, "QTensor"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 6))


def test_cpu_kernel_checks_its_inputs():
    impl_or_skip("quantize", "cpu")
    x = torch.randn(8)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.pytrain.quantize(x, "int8", 0, False, 0)
    with pytest.raises(RuntimeError, match="unknown format"):
        torch.ops.pytrain.quantize(x, "fp4", 4, False, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.pytrain.quantize(torch.randn(4, 4).t(), "int8", 4, False, 0)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.pytrain.dequantize(torch.zeros(8, dtype=torch.int8), torch.zeros(3), 4, torch.float32)


# ------------------------------------------------------------------------------------------ opcheck
OP_NAMES = {"cpu": "{}", "reference": "{}_reference", "triton": "{}_triton"}


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_opcheck(impl):
    impl_or_skip("quantize", impl)
    x = torch.randn(5, 60)
    quantize_op = getattr(torch.ops.pytrain, OP_NAMES[impl].format("quantize")).default
    dequantize_op = getattr(torch.ops.pytrain, OP_NAMES[impl].format("dequantize")).default
    torch.library.opcheck(quantize_op, (x, "int8", 16, True, 3))
    torch.library.opcheck(quantize_op, (x.half(), "fp8_e4m3", 300, False, 0))
    data, scales = quantize_op(x, "int8", 7, False, 0)
    torch.library.opcheck(dequantize_op, (data, scales, 7, torch.float16))
    # test_schema's mutation check multiplies the inputs, which torch cannot do for float8 on the CPU
    data, scales = quantize_op(x, "fp8_e5m2", 7, False, 0)
    torch.library.opcheck(dequantize_op, (data, scales, 7, torch.float32),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
