"""The chunk walk shared by the fused linear losses on the GPU path (``kernels/linear_cross_entropy.py``,
``kernels/linear_distillation_loss.py``; the C++ kernels' twin is ``csrc/linear_chunks.h``): a loss of the logits
x = hidden @ weight^T and its gradients for hidden and weight, never holding the (N, V) logits.  Memory
O(chunk x V + V x H).  Also ``skip_row``, the row kernels' handling of a token whose target is ignored (loss 0, gradient row 0) or
outside [0, V) (NaN loss and gradient row).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


def walk_linear_chunks(hidden: Tensor, weight: Tensor, chunk: int, grad: bool,
                       rows: Callable[[int, Tensor], None]) -> Tuple[Tensor, Optional[Tensor]]:
    """The chunk walk of the fused linear losses: per chunk of ``chunk`` rows of
    hidden (N, H), the float32 logits x = hidden[chunk] @ weight^T (torch.mm), ``rows(r0, x)``, which computes the
    chunk's losses and, with ``grad``, overwrites x with dloss/dx, then grad_hidden[chunk] = dx @ weight and
    grad_weight += dx^T @ hidden[chunk] (dx rounded to the inputs' dtype, grad_weight accumulated in float32).
    Returns (grad_hidden (N, H) or empty, grad_weight's float32 accumulator (V, H) or None)."""
    n = hidden.shape[0]
    f32 = hidden.dtype == torch.float32
    grad_hidden = torch.empty_like(hidden) if grad else hidden.new_empty(0)
    gw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad else None
    for r0 in range(0, n, chunk):
        h = hidden[r0:r0 + chunk]
        x = torch.mm(h, weight.t()).float()
        rows(r0, x)
        if not grad:
            continue
        d = x if f32 else x.to(hidden.dtype)
        torch.mm(d, weight, out=grad_hidden[r0:r0 + chunk])
        gw_acc.addmm_(d.t(), h) if f32 else gw_acc.add_(torch.mm(d.t(), h))
    return grad_hidden, gw_acc


@triton.jit
def skip_row(row_ptr, loss_ptr, t, V, ignore_index, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """A row whose target t is ignore_index (loss 0, with GRAD its V float32 entries at row_ptr 0) or outside
    [0, V) (NaN loss and row: a wrong target gives NaN rather than a wrong number): writes that and returns True;
    any other row: writes nothing and returns False."""
    skip = (t == ignore_index) | (t < 0) | (t >= V)
    if skip:
        value = tl.where(t == ignore_index, 0.0, float("nan"))
        tl.store(loss_ptr, value)
        if GRAD:
            for j in range(0, V, BLOCK):
                offs = j + tl.arange(0, BLOCK)
                tl.store(row_ptr + offs, tl.zeros([BLOCK], tl.float32) + value, mask=offs < V)
    return skip
