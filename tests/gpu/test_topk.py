"""GPU: ``topk_filter``'s "cuda" and "triton" backends on CUDA tensors against the float64 reference (the exact
selected set, values bit for bit), and ``pytrain.comm.topk`` (exact and approximate) on them; odd sizes up to
~10M elements, float32 / bfloat16 / float16, NaN and infinities, poisoned outputs."""
import importlib
import math

import pytest
import torch
from torch import Tensor

from pytrain.comm import topk, topk_k
from pytrain.ops import topk as topk_ops
from pytrain.testing import gpu
from pytrain.testing.backends import backend_op, impl_or_skip

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = [(1,), (7,), (3, 37, 5), (2, 70001), (3, 50021), (10_000_019,)]
#: approximate mode keeps between k and ceil(MAX_EXCESS k) entries (pytrain.comm.topk is also the function)
MAX_EXCESS = importlib.import_module("pytrain.comm.topk").MAX_EXCESS


def _bits(t: Tensor) -> Tensor:
    return t.cpu().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _sample(shape, dtype, seed, nan=True) -> Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = x.view(-1)
    if flat.numel() > 4:
        flat[1], flat[-2] = math.inf, -math.inf
        if nan:
            flat[2] = math.nan
    return x.to(FLOATS[dtype])


def check_filter(impl, x: Tensor, threshold: float, msg: str) -> None:
    values, indices = backend_op("topk_filter", impl)(x.to(gpu.DEVICE), threshold)
    ref_values, ref_indices = topk_ops.topk_filter_reference(x.double(), threshold)
    assert values.device.type == gpu.DEVICE and indices.dtype == torch.int64 and values.dtype == x.dtype, msg
    assert torch.equal(indices.cpu(), ref_indices), f"{msg}: selected set differs"
    assert torch.equal(_bits(values), _bits(x.flatten()[ref_indices])), f"{msg}: values are not x[indices]"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_filter_matches_float64_reference(impl, dtype, shape):
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    x = _sample(shape, dtype, seed=1)
    mags = x.float().abs().nan_to_num(0.0).flatten().sort().values
    for q in (0.0, 0.5, 0.9, 0.999):
        threshold = float(mags[int(q * (x.numel() - 1))])
        check_filter(impl, x, threshold, f"{impl} {dtype} {shape} threshold q{q}")


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_extremes(impl):
    """Threshold 0 keeps everything (NaN too), +inf keeps the infinities and NaNs, a huge one only NaNs and inf."""
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    x = torch.tensor([0.0, -0.0, 1.0, math.nan, -math.inf, 3e38, -2.0])
    for threshold in (0.0, math.inf, 3.1e38, 2.0):
        check_filter(impl, x, threshold, f"{impl} threshold {threshold}")


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_subnormal_threshold_and_values(impl):
    """|x| >= t is evaluated in float32 with float32 subnormals (the CUDA kernels are compiled with
    --use_fast_math: a flush-to-zero comparison would keep the zeros, or drop subnormal entries)."""
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    s = 2.0**-126
    x = torch.tensor([0.0, -0.0, 0.5 * s, -0.25 * s, 2.0**-149, s, -3.0, 0.75 * s, 1e-30])
    for threshold in (2.0**-149, 0.3 * s, 0.5 * s, s):
        check_filter(impl, x, threshold, f"{impl} threshold {threshold!r}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("shape", [(3, 37, 5), (40009,), (3, 50021), (10_000_019,)], ids=str)
def test_topk_exact_is_torch_topk(impl, dtype, shape):
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    x = _sample(shape, dtype, seed=2, nan=False).to(gpu.DEVICE)
    for ratio in (0.001, 0.01, 0.3):
        k = topk_k(x.numel(), ratio)
        values, indices = topk(x, ratio, exact=True, impl=impl)
        assert values.numel() == k and indices.unique().numel() == k
        assert torch.equal(_bits(values), _bits(x.flatten()[indices]))
        expected = torch.topk(x.flatten().abs().double(), k).values
        assert torch.equal(values.abs().double().sort(descending=True).values, expected), \
            f"{impl} {dtype} {shape} ratio {ratio}: not the top-k magnitudes"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(FLOATS))
def test_topk_approximate_count_and_mass(impl, dtype):
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    x = torch.randn(3_000_017, generator=torch.Generator().manual_seed(3)).to(FLOATS[dtype]).to(gpu.DEVICE)
    for ratio in (0.001, 0.01, 0.1):
        k = topk_k(x.numel(), ratio)
        values, indices = topk(x, ratio, impl=impl)
        assert k <= values.numel() <= math.ceil(MAX_EXCESS * k), f"{impl} ratio {ratio}: {values.numel()} for k={k}"
        assert indices.unique().numel() == indices.numel()
        assert torch.equal(_bits(values), _bits(x.flatten()[indices]))
        exact_kth = torch.topk(x.flatten().abs().float(), k).values[-1]
        assert int((values.abs().float() >= exact_kth).sum()) >= k, "does not hold an exact top-k"


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_outputs(impl):
    """Values, indices (and Triton's per-block counts) allocated holding garbage: all must be written."""
    impl_or_skip("topk_filter", impl, gpu.DEVICE)
    x = _sample((2, 70001), "float32", seed=4)
    mags = x.abs().nan_to_num(0.0).flatten().sort().values
    for byte in gpu.POISON_BYTES:
        for q in (0.0, 0.9):
            with gpu.poisoned(byte):
                check_filter(impl, x, float(mags[int(q * (x.numel() - 1))]), f"{impl} poisoned {byte:#x} q{q}")
