"""GPU: ``global_norm``'s "cuda" and "triton" backends on CUDA tensors against the reference and the exact
float64 norm (float32 / bfloat16 / float16; odd sizes, one 1-element tensor, 200 tensors, ~10M elements), and
with poisoned buffers (per-block partial sums and the result allocated holding garbage)."""
import pytest
import torch

import pytrain.ops as ops
from pytrain.testing import gpu
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.multi_tensor import randn
from pytrain.testing.optim_compare import ODD_SHAPES
from pytrain.testing.tolerances import assert_close

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {
    "odd": ODD_SHAPES,
    "single": [(1,)],
    "many": [(1 + (i * 7919) % 4999,) if i % 3 else (1 + i % 13, 1 + (i * 31) % 97) for i in range(200)],
    "large": [(3, 1_000_003), (7_000_001,), (513,)],
}


def check_norm(impl, dtype, shapes, seed=5):
    impl_or_skip("global_norm", impl, gpu.DEVICE)
    tensors = randn(shapes, FLOATS[dtype], torch.Generator().manual_seed(seed), 3.0)
    norm = ops.global_norm([t.to(gpu.DEVICE) for t in tensors], impl=impl)
    assert norm.dtype == torch.float32 and norm.dim() == 0 and norm.device.type == gpu.DEVICE
    assert_close(norm, ops.global_norm(tensors, impl="reference"), dtype=torch.float32, msg=f"{impl} vs reference")
    exact = torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))
    assert_close(norm, exact, dtype=torch.float32, msg=f"{impl} vs float64")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("shapes", list(SHAPES))
def test_matches_reference(impl, dtype, shapes):
    check_norm(impl, dtype, SHAPES[shapes])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shapes", ["odd", "many"])
def test_poisoned_buffers(impl, shapes):
    for byte in gpu.POISON_BYTES:
        with gpu.poisoned(byte):
            check_norm(impl, "float32", SHAPES[shapes], seed=6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("value", [1e20, 1e-25, 3e30])
@pytest.mark.parametrize("shapes", ["odd", "many"])
def test_extreme_values(impl, dtype, value, shapes):
    """Finite values whose float32 squares overflow or underflow: float64 sums keep the norm exact to float32."""
    impl_or_skip("global_norm", impl, gpu.DEVICE)
    gen = torch.Generator().manual_seed(7)
    tensors = [(value * torch.rand(s, generator=gen, dtype=torch.float64)).to(FLOATS[dtype]) for s in SHAPES[shapes]]
    norm = ops.global_norm([t.to(gpu.DEVICE) for t in tensors], impl=impl)
    exact = value * torch.sqrt(sum((t.double() / value).pow(2).sum() for t in tensors))
    assert torch.isfinite(norm) and abs(float(norm) / float(exact) - 1) <= 2e-6, (float(norm), float(exact))
    assert torch.isinf(ops.global_norm([torch.full((100,), 3e38, device=gpu.DEVICE)], impl=impl))
