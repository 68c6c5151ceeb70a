"""pytrain.comm.topk against torch.topk(x.abs(), k) on 16M fp32 elements (N = 2^24), ratio 0.01 (k = 167772),
both providers in one process on the same input.

torch baseline (what one writes without pytrain): values, indices = torch.topk(x.abs().flatten(), k); the signed
values are then x[indices] (not timed: the baseline is only the selection).

Byte model (what pytrain's algorithm must move; GB/s and the fraction of the copy ceiling use it):
  read x once (the filter pass) 4 N + write the kept entries (4 B value + 8 B index) 12 * 1.1 k
(the random sample of 2^16 entries and the exact-mode refinement over the ~1.1 k kept entries are small).
The notes give each mode's kept count and the squared L2 mass it captures relative to the exact top-k.
Targets: approximate >= 10x faster than torch and >= 98% of the exact top-k's squared L2 mass; exact no slower.
"""
import importlib

import pytest
import torch

from pytrain.comm import topk, topk_k

topk_module = importlib.import_module("pytrain.comm.topk")
PROVIDERS = ("torch", "pytrain")
N, RATIO = 1 << 24, 0.01
K = topk_k(N, RATIO)
BYTES = 4 * N + 12 * topk_module.MARGIN * K
TARGETS = {False: "ratio <= 0.1x (>= 10x faster), >= 98% of the exact top-k's squared L2 mass",
           True: "ratio <= 1.0x (no slower than torch.topk)"}


@pytest.fixture(scope="module")
def data(bench_device):
    return torch.randn(N, device=bench_device, generator=torch.Generator(bench_device).manual_seed(0))


@pytest.fixture(scope="module")
def quality(data):
    """mode -> kept count (in units of k) and captured squared L2 mass relative to torch's exact top-k."""
    exact_mass = torch.topk(data.abs(), K).values.double().pow(2).sum()
    out = {}
    for exact in (False, True):
        values, _ = topk(data, RATIO, exact=exact)
        out[exact] = (f"measured {values.numel() / K:.3f} k kept, "
                      f"{float(values.double().pow(2).sum() / exact_mass):.2%} of the exact mass")
    return out


@pytest.mark.parametrize("exact", [False, True], ids=["approximate", "exact"])
def test_topk(exact, provider, impl, data, quality, measure):
    if provider == "torch":
        step = lambda: torch.topk(data.abs(), K)  # noqa: E731
    else:
        step = lambda: topk(data, RATIO, exact=exact, impl=impl)  # noqa: E731
    measure(step, case=f"topk {'exact' if exact else 'approximate'}, 16M fp32, ratio {RATIO}", provider=provider,
            bytes_moved=BYTES, op="topk_filter", impl=impl, baseline="torch.topk(x.abs(), k)",
            target=f"{TARGETS[exact]}; {quality[exact]}")
