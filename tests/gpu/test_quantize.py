"""GPU: ``quantize`` / ``dequantize``'s "cuda" and "triton" backends on CUDA tensors against the reference run on
the CPU, bit for bit (codes, scales and dequantized values: the contract in pytrain/ops/quantize.py fixes every
rounding).

Also the codec ops of the quantized all-reduce hook (quantize_into with and without error feedback,
requantize_mean over 1-3 strided rows with residuals of every length, dequantize_into) against their references.

Covered: every format (int8, fp8_e4m3, fp8_e5m2) and granularity (per tensor, per block with a partial last
block, per axis through pytrain.quant), float32 / bfloat16 / float16 inputs, odd sizes, groups larger than one
program (the two-phase path), stochastic int8 with seeds whose low / high 32-bit words are 1 (1, 2**32 + 1),
tiny and subnormal groups at the flush-to-zero threshold (the CUDA kernels are compiled with
--use_fast_math, which flushes float32 subnormals unless the code avoids it), every code decoded, and
outputs allocated holding garbage (poisoned).
"""
import math

import pytest
import torch

from pytrain.ops.quantize import (FORMATS, dequantize_groups, dequantize_into, quantize_groups, quantize_into,
                                  requantize_mean)
from pytrain.quant import dequantize, quantize
from pytrain.testing import gpu
from pytrain.testing.backends import impl_or_skip

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FMTS = list(FORMATS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRANULARITIES = {"tensor": {}, "block7": dict(block_size=7), "block256": dict(block_size=256),
                 "rows": dict(axis=0), "columns": dict(axis=-1)}
FLT_MIN = 2.0**-126


def _bytes(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _on(impl):
    impl_or_skip("quantize", impl, gpu.DEVICE)
    impl_or_skip("dequantize", impl, gpu.DEVICE)


def assert_same(actual_data, actual_scales, expected_data, expected_scales, msg):
    """Codes (as bytes) and scales bit for bit, NaN scales equal; actual on the GPU, expected on the CPU."""
    assert actual_data.device.type == gpu.DEVICE and actual_data.dtype == expected_data.dtype, msg
    assert actual_data.shape == expected_data.shape and actual_scales.shape == expected_scales.shape, msg
    a, e = _bytes(actual_data.cpu()), _bytes(expected_data)
    if not torch.equal(a, e):
        bad = (a != e).flatten().nonzero().flatten()
        raise AssertionError(f"{msg}: {bad.numel()} of {e.numel()} codes differ, first at flat index "
                             f"{int(bad[0])}: {int(a.flatten()[bad[0]])} vs {int(e.flatten()[bad[0]])}")
    torch.testing.assert_close(actual_scales.cpu(), expected_scales, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{msg}: scales: {m}")


def assert_same_values(actual, expected, msg):
    """Dequantized values bit for bit (NaN equal NaN)."""
    a, e = actual.cpu(), expected
    assert a.dtype == e.dtype and a.shape == e.shape, msg
    same = (a == e) | (a.isnan() & e.isnan())
    if not bool(same.all()):
        i = int((~same).flatten().nonzero()[0])
        raise AssertionError(f"{msg}: {int((~same).sum())} of {e.numel()} values differ, first at flat index {i}: "
                             f"{float(a.flatten()[i])!r} vs {float(e.flatten()[i])!r}")
    numbers = ~e.isnan()
    assert torch.equal(torch.signbit(a[numbers]), torch.signbit(e[numbers])), f"{msg}: signs of zeros differ"


def _sample(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DTYPES[dtype])
    flat = x.view(-1)
    flat[3:10] = 0.0  # a zero run (a whole 7-element block)
    return x


# ------------------------------------------------------------------------------------ backends vs reference
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("gran", list(GRANULARITIES))
def test_quantize_matches_reference(impl, dtype, fmt, gran):
    _on(impl)
    x = _sample((37, 29), dtype)
    actual = quantize(x.to(gpu.DEVICE), fmt, impl=impl, **GRANULARITIES[gran])
    expected = quantize(x, fmt, impl="reference", **GRANULARITIES[gran])
    msg = f"{impl} {fmt} {gran} {dtype}"
    assert_same(actual.data, actual.scales, expected.data, expected.scales, msg)
    for out_dtype in (torch.float32, DTYPES[dtype]):
        got = dequantize(actual, out_dtype, impl=impl)
        assert_same_values(got, dequantize(expected, out_dtype, impl="reference"), f"{msg} -> {out_dtype}")


# Groups of one program and of several (two-phase path: Triton above 4096 elements, CUDA above 8192), partial
# last groups, an odd total of ~1M elements with its absmax in a late piece.
LARGE_GROUPS = [None, 1, 4096, 4097, 8193, 100_003]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_groups_match_reference(impl, fmt, dtype):
    _on(impl)
    n = 1_000_003
    x = _sample((n,), dtype, seed=1)
    x[n - 5000] = -40.0  # the absmax sits in a later piece
    for group in LARGE_GROUPS:
        group = group or n
        got = quantize_groups(x.to(gpu.DEVICE), fmt, group, impl=impl)
        want = quantize_groups(x, fmt, group, impl="reference")
        assert_same(got[0], got[1], want[0], want[1], f"{impl} {fmt} {dtype} group {group}")
        out = dequantize_groups(got[0], got[1], group, torch.float32, impl=impl)
        assert_same_values(out, dequantize_groups(want[0], want[1], group, torch.float32, impl="reference"),
                           f"{impl} {fmt} {dtype} group {group} dequantized")


# seeds: 0; low word 1 (a launch argument equal to 1 is specialized by Triton unless told not to); low and high
# words 1; the high word counts; the largest seed.
SEEDS = [0, 1, 2**32 + 1, 12345678901, 2**63 - 1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("seed", SEEDS)
def test_stochastic_codes_match_reference(impl, dtype, seed):
    _on(impl)
    x = _sample((1031,), dtype, seed=2)
    for kwargs in (dict(block_size=256), dict(block_size=1031), {}):  # partial last block; per tensor
        actual = quantize(x.to(gpu.DEVICE), "int8", stochastic=True, seed=seed, impl=impl, **kwargs)
        expected = quantize(x, "int8", stochastic=True, seed=seed, impl="reference", **kwargs)
        assert_same(actual.data, actual.scales, expected.data, expected.scales, f"{impl} seed {seed} {kwargs}")
    big = _sample((3, 70001), dtype, seed=3)  # flat indices past 2**16, several programs, the two-phase path
    for group in (256, big.numel()):
        got = quantize_groups(big.to(gpu.DEVICE), "int8", group, stochastic=True, seed=seed, impl=impl)
        want = quantize_groups(big, "int8", group, stochastic=True, seed=seed, impl="reference")
        assert_same(got[0], got[1], want[0], want[1], f"{impl} seed {seed} group {group}")


# ---------------------------------------------------------------------------------- tiny / subnormal groups
def _tiny_groups(fmt: str) -> torch.Tensor:
    """Groups of 8 float32 values around the flush threshold qmax * 2^-126 (tiny), with subnormal elements.

    g0: amax exactly tiny (a live group: scale 2^-126, inv 2^126) and subnormal elements, whose codes are
        x / 2^-126 rounded: non-zero in the reference, zero where subnormal inputs are flushed;
    g1: amax one float32 ulp below tiny (a zero group: scale 0, codes 0);
    g2: amax 3 tiny, subnormals and normals;
    g3: amax 1 with a subnormal element (code 0 everywhere);
    g4: only subnormals (a zero group);
    g5: amax 2 tiny with subnormals of both signs.
    Dequantizing g0 / g2 / g5 multiplies fp8 subnormal codes by a scale near 2^-126: subnormal float32 outputs.
    """
    tiny = FORMATS[fmt].qmax * FLT_MIN
    below = float(torch.nextafter(torch.tensor(tiny), torch.tensor(0.0)))  # one float32 ulp below
    s = FLT_MIN
    groups = [
        [tiny, 0.3 * s, 0.6 * s, -0.9 * s, 2.0**-149, -tiny / 2, 0.0, -0.0],
        [below, 0.5 * s, -below, 0.25 * s, 0.0, 0.0, 0.0, 0.0],
        [3 * tiny, -0.75 * s, 2 * s, tiny / 3, -0.1 * s, 5 * s, 0.0, 0.5 * s],
        [1.0, 0.5 * s, -0.25, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.9 * s, -0.7 * s, 2.0**-149, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-2 * tiny, 0.99 * s, -0.99 * s, 0.01 * s, tiny, -tiny, 0.45 * s, -0.55 * s],
    ]
    return torch.tensor(groups, dtype=torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16 has float32's subnormals
def test_tiny_and_subnormal_groups(impl, fmt, dtype):
    _on(impl)
    x = _tiny_groups(fmt).to(DTYPES[dtype])
    actual = quantize_groups(x.to(gpu.DEVICE), fmt, 8, impl=impl)
    expected = quantize_groups(x, fmt, 8, impl="reference")
    assert expected[1][1] == 0.0 and expected[1][4] == 0.0  # the zero groups of the contract
    assert expected[1][0] > 0.0
    msg = f"{impl} {fmt} {dtype} tiny groups"
    assert_same(actual[0], actual[1], expected[0], expected[1], msg)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = dequantize_groups(actual[0], actual[1], 8, out_dtype, impl=impl)
        want = dequantize_groups(expected[0], expected[1], 8, out_dtype, impl="reference")
        assert_same_values(out, want, f"{msg} -> {out_dtype}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_every_code(impl, fmt):
    """All 256 codes (fp8 NaN / inf and subnormals included) times normal, subnormal-producing, subnormal (a
    scale that no quantize writes, but dequantize accepts: mul.rn.ftz under --use_fast_math flushed it) and zero
    scales."""
    impl_or_skip("dequantize", impl, gpu.DEVICE)
    data = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FORMATS[fmt].dtype).repeat(5)
    scales = torch.tensor([1.0, 0.375, FLT_MIN, FLT_MIN * 2.0**-13, 0.0])
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = dequantize_groups(data.to(gpu.DEVICE), scales.to(gpu.DEVICE), 256, out_dtype, impl=impl)
        want = dequantize_groups(data, scales, 256, out_dtype, impl="reference")
        assert_same_values(out, want, f"{impl} {fmt} -> {out_dtype}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_non_finite_groups(impl, fmt):
    _on(impl)
    x = torch.randn(4, 64)
    x[1, 10], x[2, 0], x[3, 63] = math.nan, math.inf, -math.inf
    for group in (64, 256):
        got = quantize_groups(x.to(gpu.DEVICE), fmt, group, impl=impl)
        want = quantize_groups(x, fmt, group, impl="reference")
        assert_same(got[0], got[1], want[0], want[1], f"{impl} {fmt} group {group}")


# ---------------------------------------------------------------------------------------------- poisoned
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_poisoned_outputs(impl, fmt):
    """Outputs allocated holding garbage (two patterns): every code, scale and value must be written."""
    _on(impl)
    x = _sample((3, 70001), "float32", seed=4)
    for byte in gpu.POISON_BYTES:
        for group in (7, 256, 4097, x.numel()):
            stochastic = fmt == "int8" and group == 256
            with gpu.poisoned(byte):
                got = quantize_groups(x.to(gpu.DEVICE), fmt, group, stochastic=stochastic, seed=5, impl=impl)
                out = dequantize_groups(got[0], got[1], group, torch.float16, impl=impl)
            want = quantize_groups(x, fmt, group, stochastic=stochastic, seed=5, impl="reference")
            msg = f"{impl} {fmt} group {group} poisoned with {byte:#x}"
            assert_same(got[0], got[1], want[0], want[1], msg)
            assert_same_values(out, dequantize_groups(want[0], want[1], group, torch.float16, impl="reference"),
                               msg + " dequantized")


# ------------------------------------------------------------------------------------ codec ops of the hook
def _codec_sample(n, seed):
    """Gradient-like float32 values over several magnitudes, a zero run, a subnormal and a NaN-free tail."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-12, 4, (n,), generator=gen).float())
    x[3:10] = 0.0
    x[11] = FLT_MIN / 4
    return x


def _packed(rows, n, fmt, group, seed):
    """(data (rows, n), scales (rows, groups)): strided rows of one uint8 buffer (codes, 4-byte pad, scales)."""
    at = -(-(n + 3) // 4) * 4
    buf = torch.zeros((rows, at + 4 * (-(-n // group))), dtype=torch.uint8)
    data, scales = buf[:, :n].view(FORMATS[fmt].dtype), buf[:, at:].view(torch.float32)
    for w in range(rows):
        codes, s = quantize_groups(_codec_sample(n, seed + w) * (w + 1), fmt, group, impl="reference")
        data[w].copy_(codes)
        scales[w].copy_(s)
    return buf, data, scales


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", [7, 256, 8193, 100_003])
def test_quantize_into_matches_reference(impl, fmt, dtype, group):
    impl_or_skip("quantize_into", impl, gpu.DEVICE)
    n = 300_007
    x = _codec_sample(n, 1).to(DTYPES[dtype])
    x[n // 2] = math.nan
    r = _codec_sample(n, 2) * 1e-2
    for residual in (None, r):
        want_data, want_scales = torch.empty(n, dtype=FORMATS[fmt].dtype), torch.empty(-(-n // group))
        want_r = None if residual is None else residual.clone()
        quantize_into(x, want_r, want_data, want_scales, fmt, group, impl="reference")
        got_data = torch.empty(n, dtype=FORMATS[fmt].dtype, device=gpu.DEVICE)
        got_scales = torch.full((-(-n // group),), 7.0, device=gpu.DEVICE)
        got_r = None if residual is None else residual.to(gpu.DEVICE)
        quantize_into(x.to(gpu.DEVICE), got_r, got_data, got_scales, fmt, group, impl=impl)
        msg = f"quantize_into {impl} {fmt} {dtype} group {group} residual {residual is not None}"
        assert_same(got_data, got_scales, want_data, want_scales, msg)
        if residual is not None:
            assert_same_values(got_r, want_r, f"{msg}: residual")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("group", [7, 256, 8193])
def test_requantize_mean_matches_reference(impl, fmt, rows, group):
    impl_or_skip("requantize_mean", impl, gpu.DEVICE)
    n = 100_003
    buf, data, scales = _packed(rows, n, fmt, group, seed=3)
    scales[0, 2] = math.nan
    for m in (None, 0, n // 2, n):
        residual = None if m is None else _codec_sample(m, 4) * 1e-2
        want = torch.empty(n, dtype=data.dtype), torch.empty(-(-n // group))
        want_r = None if residual is None else residual.clone()
        requantize_mean(data, scales, *want, want_r, group, impl="reference")
        gbuf = buf.to(gpu.DEVICE)
        gdata, gscales = gbuf[:, :n].view(data.dtype), gbuf[:, -scales.shape[1] * 4:].view(torch.float32)
        got = torch.empty(n, dtype=data.dtype, device=gpu.DEVICE), torch.full((-(-n // group),), 7.0, device=gpu.DEVICE)
        got_r = None if residual is None else residual.to(gpu.DEVICE)
        requantize_mean(gdata, gscales, *got, got_r, group, impl=impl)
        msg = f"requantize_mean {impl} {fmt} rows {rows} group {group} m {m}"
        assert_same(got[0], got[1], want[0], want[1], msg)
        if residual is not None:
            assert_same_values(got_r, want_r, f"{msg}: residual")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_into_matches_reference(impl, fmt, dtype):
    impl_or_skip("dequantize_into", impl, gpu.DEVICE)
    n, group = 100_003, 256
    _, data, scales = _packed(1, n, fmt, group, seed=5)
    want = torch.empty(n, dtype=DTYPES[dtype])
    dequantize_into(data[0], scales[0], group, want, impl="reference")
    got = torch.full((n,), 7.0, dtype=DTYPES[dtype], device=gpu.DEVICE)
    dequantize_into(data[0].to(gpu.DEVICE), scales[0].to(gpu.DEVICE), group, got, impl=impl)
    assert_same_values(got, want, f"dequantize_into {impl} {fmt} {dtype}")
