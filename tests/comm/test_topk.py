"""pytrain.comm.topk and its kernel ``topk_filter`` against the reference (pytrain/ops/topk.py).

The filter kernel of every backend must pick exactly the reference's set, compared in float64 (float32 / bfloat16
/ float16 widen to float64 without rounding); ``topk`` in exact mode must give torch.topk's set (ties aside), and in
approximate mode between k and ceil(1.25 k) entries holding an exact top-k.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor

from pytrain.comm import topk, topk_k
from pytrain.ops import NoImplementationError
from pytrain.ops import topk as topk_ops
from pytrain.testing.backends import impl_or_skip, triton_device

topk_module = importlib.import_module("pytrain.comm.topk")  # (pytrain.comm.topk is also the function)
IMPLS = ("cpu", "cuda", "triton", "reference")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: odd sizes, a partial 64-element group, several 64K-element CPU chunks
SHAPES = [(1,), (7,), (3, 37, 5), (2, 70001)]
#: the sampled path (more than topk.SMALL entries)
LARGE = [(40009,), (3, 50021)]


def _device(impl: str, dtype: torch.dtype, large: bool = False) -> str:
    device = "cuda" if impl == "cuda" else triton_device() if impl == "triton" else "cpu"
    impl_or_skip("topk_filter", impl, device)
    if device == "cuda":
        return "cuda"
    if impl == "triton" and (dtype == torch.bfloat16 or large):
        pytest.skip("the Triton interpreter is tested in float32/float16 on small shapes")
    return "cpu"


def _sample(shape, dtype, device, gen, nan: bool = False) -> Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1)
    if flat.numel() > 4:
        flat[1], flat[-2] = math.inf, -math.inf
        if nan:
            flat[2] = math.nan
    return x.to(dtype).to(device)


def _filter_op(impl: str):
    return getattr(torch.ops.pytrain, "topk_filter" if impl in ("cpu", "cuda") else f"topk_filter_{impl}")


def _bits(t: Tensor) -> Tensor:
    return t.cpu().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_filter_matches_float64_reference(impl, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    device = _device(impl, dtype, large=math.prod(shape) > 10_000)
    x = _sample(shape, dtype, device, gen, nan=True)
    threshold = float(x.float().abs().nan_to_num(0.0).flatten().sort().values[int(0.9 * x.numel())].cpu())
    values, indices = _filter_op(impl)(x, threshold)
    ref_values, ref_indices = topk_ops.topk_filter_reference(x.cpu().double(), threshold)
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(_bits(values), _bits(x.flatten()[indices])), "values must be x.flatten()[indices], bit for bit"
    assert torch.equal(values.cpu().double().nan_to_num(7.0), ref_values.nan_to_num(7.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_filter_extremes(impl):
    """Threshold 0 keeps everything (NaN too), +inf keeps the infinities and NaNs, a huge one only NaNs."""
    device = _device(impl, torch.float32)
    x = torch.tensor([0.0, -0.0, 1.0, math.nan, -math.inf, 3e38, -2.0], device=device)
    for threshold, expected in ((0.0, list(range(7))), (math.inf, [3, 4]), (3.1e38, [3, 4]), (2.0, [3, 4, 5, 6])):
        assert _filter_op(impl)(x, threshold)[1].cpu().tolist() == expected


def _assert_valid_selection(x: Tensor, values: Tensor, indices: Tensor) -> None:
    flat = x.flatten()
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    assert indices.unique().numel() == indices.numel(), "indices repeat"
    assert torch.equal(_bits(values), _bits(flat[indices]))


def _exact_cases():
    for impl in IMPLS:
        for dtype in FLOATS + ((torch.float64,) if impl == "reference" else ()):
            for shape in SHAPES[1:] + LARGE:
                yield from ((impl, dtype, shape, ratio) for ratio in ((0.01, 0.3, 1.0) if shape == LARGE[0] else
                                                                      (0.01, 0.3)))


@pytest.mark.parametrize("impl, dtype, shape, ratio", list(_exact_cases()))
def test_exact_is_torch_topk(impl, dtype, shape, ratio):
    device = _device(impl, dtype, large=math.prod(shape) > 10_000)
    x = _sample(shape, dtype, device, torch.Generator().manual_seed(2))
    k = topk_k(x.numel(), ratio)
    values, indices = topk(x, ratio, exact=True, impl=impl)
    _assert_valid_selection(x, values, indices)
    expected = torch.topk(x.flatten().abs().double(), k).values
    assert torch.equal(values.abs().double().sort(descending=True).values, expected), "not the top-k magnitudes"


@pytest.mark.parametrize("impl", ("cpu", "cuda", "reference"))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("dist", ["gaussian", "heavy"])
def test_approximate_count_and_mass(impl, dtype, ratio, dist):
    device = _device(impl, dtype, large=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300007, generator=gen)
    if dist == "heavy":  # Student-t with 2 degrees of freedom: a few huge entries
        x = x / torch.randn(300007, generator=gen).pow(2).add(torch.randn(300007, generator=gen).pow(2)).div(2).sqrt()
    x = x.to(dtype).to(device)
    k = topk_k(x.numel(), ratio)
    values, indices = topk(x, ratio, impl=impl)
    _assert_valid_selection(x, values, indices)
    assert k <= values.numel() <= math.ceil(topk_module.MAX_EXCESS * k)
    exact_kth = torch.topk(x.flatten().abs().float(), k).values[-1]
    assert int((values.abs().float() >= exact_kth).sum()) >= k, "does not hold an exact top-k"
    mass = values.double().pow(2).sum() / torch.topk(x.flatten().abs().double(), k).values.pow(2).sum()
    assert mass >= 0.98


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("n", [1000, 100003])
def test_nan_is_always_selected(exact, n):
    x = torch.randn(n)
    where = torch.tensor([5, n // 2, n - 1])
    x[where] = math.nan
    values, indices = topk(x, 0.01, exact=exact)
    assert set(where.tolist()) <= set(indices.tolist())
    assert int(values.isnan().sum()) == 3
    values, indices = topk(x, 1 / n, exact=True)  # k = 1: one of the NaNs
    assert indices.numel() == 1 and values.isnan().all()


def test_k_rounding():
    assert topk_k(5, 0.5) == 2  # round half to even: 2.5 -> 2
    assert topk_k(7, 0.5) == 4  # 3.5 -> 4
    assert topk_k(1000, 1e-6) == 1  # at least one
    assert topk_k(10, 1.0) == 10
    assert topk(torch.randn(5), 0.5, exact=True)[0].numel() == 2


def test_sampling_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    topk(torch.randn(100003, generator=torch.Generator().manual_seed(0)), 0.01)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        topk(torch.randn(10), ratio)


@pytest.mark.parametrize("ratio", [True, False, "0.1", None, torch.tensor(0.1)])
def test_ratio_must_be_a_number(ratio):
    with pytest.raises(TypeError, match="ratio must be a float in"):
        topk(torch.randn(10), ratio)


def test_generator_argument():
    """The sample follows the given generator: equal states give equal selections; a wrong one is refused."""
    x = torch.randn(200003, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first = topk(x, 0.01, generator=gen)
    gen.set_state(state)
    again = topk(x, 0.01, generator=gen)
    assert torch.equal(first[1], again[1])
    with pytest.raises(TypeError, match="generator must be a torch.Generator on cpu"):
        topk(x, 0.01, generator=0)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype torch.int32 not supported"):
        topk(torch.ones(10, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="not supported"):
        topk(torch.ones(10, dtype=torch.complex64), 0.1)
    with pytest.raises(ValueError, match="empty"):
        topk(torch.ones(0), 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        topk(torch.randn(50, 40).t(), 0.1)
    with pytest.raises(NoImplementationError, match="float64"):
        topk(torch.randn(100003, dtype=torch.float64), 0.1, impl="cpu")


def test_cpu_kernel_checks():
    impl_or_skip("topk_filter", "cpu")
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.pytrain.topk_filter(torch.randn(8, 8).t(), 0.5)
    with pytest.raises(RuntimeError, match="supports float32, bfloat16 and float16"):
        torch.ops.pytrain.topk_filter(torch.randn(8, dtype=torch.float64), 0.5)


@pytest.mark.parametrize("impl", ("cpu", "triton", "reference"))
def test_opcheck(impl):
    impl_or_skip("topk_filter", impl)
    torch.library.opcheck(_filter_op(impl).default, (torch.randn(3, 67), 1.0))


@pytest.mark.parametrize("exact", [False, True])
def test_mostly_zero_and_mostly_nan(exact):
    """Degenerate samples: a threshold of 0 (keep all, then refine) and of +inf (lowered until k are kept)."""
    x = torch.zeros(100003)
    x[torch.tensor([7, 500, 99999])] = torch.tensor([3.0, -1.0, 2.0])
    values, indices = topk(x, 0.01, exact=exact)
    assert values.numel() == topk_k(x.numel(), 0.01) and {7, 500, 99999} <= set(indices.tolist())
    x = torch.full((100003,), math.nan)
    x[:100] = 1.0
    values, _ = topk(x, 0.5, exact=exact)
    assert values.numel() >= topk_k(x.numel(), 0.5) and values.isnan().all()
