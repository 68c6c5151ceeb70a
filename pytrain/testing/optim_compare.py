"""Side-by-side optimizer runs: the same params and gradients fed to two optimizers, step by step.

Used by the optimizer tests (pytrain vs torch.optim / timm) and by the benchmarks.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from pytrain.ops.multi_tensor import storage_perm

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
    """Step both optimizers with the same gradients (cast to each side's dtype and device, in each param's
    memory layout as autograd gives them: channels_last for a channels_last weight...).

    Returns the largest relative difference ``max|a - b| / max|b|`` over all params and steps.
    """
    worst = 0.0
    for step, gs in enumerate(grads):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            for p, g in zip(params, gs):
                p.grad = torch.empty_like(p).copy_(g)
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


# ------------------------------------------------------------------------------------------ memory layouts
#: Params that are not contiguous, as models have them: conv weights of ``model.to(memory_format=
#: torch.channels_last)`` (dense, permuted strides), a transposed weight (dense), a column slice of a larger
#: weight (not dense: stepped through a contiguous copy).
LAYOUTS = ("channels_last", "transposed", "sliced")


def layout_params(layout: str, dtype=torch.float32, seed: int = 0, device="cpu") -> List[Tensor]:
    """Leaf params in ``layout`` (see LAYOUTS), plus a contiguous one in the same list."""
    torch.manual_seed(seed)
    if layout == "channels_last":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 5, (3, 2)))
        params = [p.detach() for p in model.to(memory_format=torch.channels_last).parameters()]
        assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[0].is_contiguous()
    elif layout == "transposed":
        params = [torch.randn(37, 300).t(), torch.randn(5, 7, 11).permute(2, 0, 1), torch.randn(300)]
    elif layout == "sliced":
        params = [torch.randn(40, 301)[:, 1:290], torch.randn(600)[::2], torch.randn(300)]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return [_strided_copy(p, dtype, device) for p in params]


def _strided_copy(p: Tensor, dtype, device) -> Tensor:
    """A leaf like ``p`` in ``dtype`` on ``device`` with the same strides (a slice stays a view of a larger base)."""
    base = torch.empty(p.storage_offset() + p.untyped_storage().nbytes() // p.element_size(), dtype=dtype,
                       device=device)
    return base.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(p).requires_grad_()


def storage_frame_mismatches(make_optimizer: Callable[[List[Tensor]], torch.optim.Optimizer], layout: str,
                             dtype=torch.float32, steps: int = 4, device="cpu") -> List[int]:
    """Steps params in ``layout`` and contiguous copies of them in their storage order (the params permuted to
    it, for dense ones, else as they are) side by side: the fused kernels see the same elements in the same
    order, so the params must agree bit for bit.  Returns the indices of params that differ."""
    ours = layout_params(layout, dtype, device=device)
    perms = [storage_perm(p) or tuple(range(p.dim())) for p in ours]
    frames = [p.detach().permute(perm).contiguous().requires_grad_() for p, perm in zip(ours, perms)]
    opt_ours, opt_frames = make_optimizer(ours), make_optimizer(frames)
    for gs in random_grads(ours, steps):
        for p, q, perm, g in zip(ours, frames, perms, gs):
            p.grad = torch.empty_like(p).copy_(g)
            q.grad = g.to(dtype=dtype, device=device).permute(perm).contiguous()
        opt_ours.step()
        opt_frames.step()
    return [i for i, (p, q, perm) in enumerate(zip(ours, frames, perms))
            if not torch.equal(p.detach().permute(perm), q.detach())]


def states_keep_layout(opt: torch.optim.Optimizer) -> bool:
    """Every state tensor shaped like a dense param has the param's strides (no copy at each step)."""
    return all(s.stride() == p.stride() for group in opt.param_groups for p in group["params"]
               if storage_perm(p) is not None
               for s in opt.state[p].values() if torch.is_tensor(s) and s.shape == p.shape)
