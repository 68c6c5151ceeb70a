"""Side-by-side optimizer runs: the same params and gradients fed to two optimizers, step by step.

Used by the optimizer tests (pytrain vs torch.optim / timm) and by the benchmarks.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

#: The GPT-like parameter set of the benchmarks: 70.8M params in 50 tensors.
GPT_SHAPES: List[Tuple[int, ...]] = [(768, 768)] * 24 + [(3072, 768)] * 12 + [(768, 3072)] * 12 + [(768,)] * 2

#: Small odd shapes for tests: not powers of two, partial int8 blocks, a scalar-like tensor.
ODD_SHAPES: List[Tuple[int, ...]] = [(1,), (5, 123, 7), (257,), (3, 300), (1000,)]


def make_params(shapes: Sequence[Tuple[int, ...]], dtype=torch.float32, device="cpu", seed: int = 0) -> List[Tensor]:
    """Fresh random leaf params (requires_grad) of the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype=dtype, device=device).requires_grad_() for s in shapes]


def clone_params(params: Sequence[Tensor], dtype=None) -> List[Tensor]:
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def random_grads(params: Sequence[Tensor], steps: int, seed: int = 1, scale: float = 1.0) -> Iterator[List[Tensor]]:
    """``steps`` lists of float64 gradients shaped like ``params``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def run_side_by_side(
    params_a: Sequence[Tensor],
    opt_a: torch.optim.Optimizer,
    params_b: Sequence[Tensor],
    opt_b: torch.optim.Optimizer,
    grads: Iterator[List[Tensor]],
    on_step: Callable[[int], None] = lambda step: None,
) -> float:
    """Step both optimizers with the same gradients (cast to each side's dtype and device).

    Returns the largest relative difference ``max|a - b| / max|b|`` over all params and steps.
    """
    worst = 0.0
    for step, gs in enumerate(grads):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            for p, g in zip(params, gs):
                p.grad = g.to(dtype=p.dtype, device=p.device)
            opt.step()
        for a, b in zip(params_a, params_b):
            ref = b.detach().double().cpu()
            diff = (a.detach().double().cpu() - ref).abs().max()
            worst = max(worst, float(diff / ref.abs().max().clamp_min(1e-30)))
        on_step(step)
    return worst


def resumed_run_difference(make_optimizer: Callable[[List[Tensor]], torch.optim.Optimizer], steps_before: int = 5,
                           steps_after: int = 5) -> float:
    """Train ``steps_before`` steps, copy params and ``state_dict`` into a fresh optimizer, then step both.

    Returns the largest relative difference between the original and the resumed run (0.0 when the
    checkpoint captures everything the optimizer needs).
    """
    params = make_params(ODD_SHAPES)
    grads = list(random_grads(params, steps_before + steps_after))
    opt = make_optimizer(params)
    for gs in grads[:steps_before]:
        for p, g in zip(params, gs):
            p.grad = g.float()
        opt.step()
    resumed_params = clone_params(params)
    resumed = make_optimizer(resumed_params)
    resumed.load_state_dict(opt.state_dict())
    return run_side_by_side(resumed_params, resumed, params, opt, iter(grads[steps_before:]))
