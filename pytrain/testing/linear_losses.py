"""Checks of the fused linear losses against float64, shared by tests/ops (CPU) and tests/gpu (CUDA).

The rule (the attention tests' rule, FlashAttention's): a backend's normwise error against the float64
reference, for the loss and every gradient, is at most twice PyTorch's own error in the same dtype plus the
dtype's allowance in ``pytrain.testing.tolerances``.  PyTorch's own: the logits materialised by ``F.linear`` in
the inputs' dtype and the loss taken in float32 (what models do today, ``stock_*`` below).

Inputs are drawn in float64 on the CPU from a seeded generator, rounded to the dtype and moved to the device,
so a case is the same numbers on every device.  Targets hit ``ignore_index`` (twice, the last row included) and
the last vocabulary row.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pytrain.ops import linear_cross_entropy, linear_distillation_loss
from pytrain.ops.linear_cross_entropy import token_losses_reference as cross_entropy_token_losses
from pytrain.ops.linear_distillation_loss import token_losses_reference as distillation_token_losses
from pytrain.testing.tolerances import LINEAR_CROSS_ENTROPY_RTOL, LINEAR_DISTILLATION_LOSS_RTOL

IGNORE = -100


def targets(n: int, vocab: int, generator: torch.Generator) -> Tensor:
    """(n,) int64 targets: random, two ``IGNORE`` (at 3 and at the last row) and ``vocab - 1`` at 5."""
    t = torch.randint(0, vocab, (n,), generator=generator)
    t[3 % n] = IGNORE
    t[n - 1] = IGNORE
    t[5 % n] = vocab - 1  # the last row of the weights
    return t


def _draw(generator: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def cross_entropy_inputs(dtype: torch.dtype, n: int, hidden: int, vocab: int, bias: bool = True, seed: int = 0,
                         device: str = "cpu") -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """hidden (n, hidden), weight (vocab, hidden), target (n,), bias (vocab,) or None."""
    g = torch.Generator().manual_seed(seed)
    h, w = _draw(g, n, hidden), _draw(g, vocab, hidden, scale=0.5 * (16 / hidden) ** 0.5)
    b = _draw(g, vocab) if bias else None
    t = targets(n, vocab, g)
    moved = [x.to(dtype).to(device) if x is not None else None for x in (h, w, b)]
    return moved[0], moved[1], t.to(device), moved[2]


def distillation_inputs(dtype: torch.dtype, n: int, student: int, teacher: int, vocab: int, seed: int = 0,
                        device: str = "cpu") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """student hidden (n, student), student weight (vocab, student), teacher hidden (n, teacher), teacher
    weight (vocab, teacher), target (n,)."""
    g = torch.Generator().manual_seed(seed)
    hs, ws = _draw(g, n, student), _draw(g, vocab, student, scale=0.5 * (12 / student) ** 0.5)
    ht, wt = _draw(g, n, teacher), _draw(g, vocab, teacher, scale=0.5 * (20 / teacher) ** 0.5)
    t = targets(n, vocab, g)
    return (*(x.to(dtype).to(device) for x in (hs, ws, ht, wt)), t.to(device))


def loss_and_grads(fn: Callable, args: Sequence, leaves: Sequence[int], **kwargs) -> List[Tensor]:
    """[loss, gradient of ``args[i]`` for each i in ``leaves`` that is not None]: ``fn(*args, **kwargs)`` with those
    arguments as fresh leaves, backpropagated from a fixed upstream gradient (a ramp, so that per-token losses of
    ``reduction="none"`` are weighted differently)."""
    args = list(args)
    for i in leaves:
        if args[i] is not None:
            args[i] = args[i].detach().clone().requires_grad_()
    loss = fn(*args, **kwargs)
    upstream = torch.linspace(-1, 2, loss.numel(), dtype=torch.float64).reshape(loss.shape).to(loss)
    grads = torch.autograd.grad(loss, [args[i] for i in leaves if args[i] is not None], upstream)
    return [loss.detach()] + list(grads)


def normwise_error(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| / max |ref|, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _reduce(losses: Tensor, counted: Tensor, reduction: str, divisor=None) -> Tensor:
    if reduction == "none":
        return losses
    if divisor is not None:
        return losses.sum() / divisor
    return losses.sum() / counted if reduction == "mean" else losses.sum()


def stock_cross_entropy(h: Tensor, w: Tensor, t: Tensor, b: Optional[Tensor], *, ignore_index: int = IGNORE,
                        label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                        reduction: str = "mean", num_items_in_batch=None) -> Tensor:
    """Materialised logits in the inputs' dtype, loss in float32 (or float64): what models do today."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    losses = cross_entropy_token_losses(F.linear(h, w, b).to(acc), t, ignore_index, label_smoothing, z_loss,
                                        softcap or 0.0)
    return _reduce(losses, (t != ignore_index).sum(), reduction, num_items_in_batch)


def stock_distillation(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, t: Optional[Tensor], *, kind: str = "kl",
                       temperature: float = 1.0, beta: float = 0.5, hard_label_weight: float = 0.0,
                       ignore_index: int = IGNORE, reduction: str = "mean") -> Tensor:
    """Both logit matrices materialised in the inputs' dtype, the divergence in float32 (or float64)."""
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    losses = distillation_token_losses(F.linear(hs, ws).to(acc), F.linear(ht, wt).to(acc), t, kind, temperature,
                                       beta, hard_label_weight, ignore_index)
    return _reduce(losses, len(losses) if t is None else (t != ignore_index).sum(), reduction)


def _check(fn: Callable, stock: Callable, args: Sequence, leaves: Sequence[int], names: Sequence[str], impl: str,
           chunk_size: Optional[int], rtol: float, options: dict) -> None:
    dtype = args[0].dtype
    f64 = [x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in args]
    expected = loss_and_grads(fn, f64, leaves, impl="reference", **options)
    ours = loss_and_grads(fn, args, leaves, impl=impl, chunk_size=chunk_size, **options)
    theirs = loss_and_grads(stock, args, leaves, **options)
    assert len(ours) == len(expected) == len(theirs)
    for name, o, s, e in zip(names, ours, theirs, expected):
        assert o.shape == e.shape and o.device == args[0].device, name
        assert o.dtype == (e.dtype if name == "loss" and dtype == torch.float64 else
                           torch.float32 if name == "loss" else dtype), name
        allowed = 2 * normwise_error(s, e) + rtol
        err = normwise_error(o, e)
        assert err <= allowed, f"{name}: error {err:.3g} > {allowed:.3g} (torch's {normwise_error(s, e):.3g})"


def check_cross_entropy(impl: str, dtype: torch.dtype, *, n: int, hidden: int, vocab: int, bias: bool = True,
                        chunk_size: Optional[int] = None, options: Optional[dict] = None, device: str = "cpu",
                        seed: int = 0) -> None:
    """``linear_cross_entropy(impl=impl)``'s loss and gradients (hidden, weight, bias) against float64."""
    args = cross_entropy_inputs(dtype, n, hidden, vocab, bias, seed, device)
    _check(linear_cross_entropy, stock_cross_entropy, args, (0, 1, 3),
           ("loss", "grad_hidden", "grad_weight", "grad_bias"), impl, chunk_size, LINEAR_CROSS_ENTROPY_RTOL[dtype],
           dict(options or {}))


def check_distillation(impl: str, dtype: torch.dtype, *, n: int, student: int, teacher: int, vocab: int,
                       chunk_size: Optional[int] = None, options: Optional[dict] = None, device: str = "cpu",
                       seed: int = 0) -> None:
    """``linear_distillation_loss(impl=impl)``'s loss and student gradients against float64 (an option
    ``target=None`` drops the targets)."""
    options = dict(options or {})
    hs, ws, ht, wt, t = distillation_inputs(dtype, n, student, teacher, vocab, seed, device)
    if "target" in options:
        t = options.pop("target")
    _check(linear_distillation_loss, stock_distillation, (hs, ws, ht, wt, t), (0, 1),
           ("loss", "grad_hidden", "grad_weight"), impl, chunk_size, LINEAR_DISTILLATION_LOSS_RTOL[dtype], options)
