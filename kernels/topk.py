"""Triton ``topk_filter(x, threshold) -> (values, indices)``: the entries of x.flatten() with |x| >= threshold or NaN,
in ascending index order (reference: ``topk_filter`` in pytrain/ops/topk.py; the threshold comes from
a sample, see pytrain/comm/topk.py).

Stream compaction in two launches with a scan between them: ``_count_kernel`` counts the selected entries of each
block, an exclusive cumulative sum of the counts gives each block's first output slot (the total sizes the
outputs: one host sync), and ``_write_kernel`` recomputes the block's mask and stores each selected entry at its
block's slot plus its rank inside the block (``tl.cumsum``).  Two reads of x; the output is small.
The comparison is in float32 (bfloat16 / float16 widen exactly).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096


@triton.jit
def _selected(x_ptr, n, threshold, pid, BLOCK: tl.constexpr):
    """Offsets, values and selection mask (|x| >= threshold or NaN) of block ``pid``."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    a = tl.abs(x.to(tl.float32))
    return offs, x, inside & ((a >= threshold) | (a != a))


@triton.jit
def _count_kernel(x_ptr, n, threshold, counts_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    _, _, sel = _selected(x_ptr, n, threshold, pid, BLOCK)
    tl.store(counts_ptr + pid, tl.sum(sel.to(tl.int64), axis=0))


@triton.jit
def _write_kernel(x_ptr, n, threshold, starts_ptr, values_ptr, indices_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, x, sel = _selected(x_ptr, n, threshold, pid, BLOCK)
    flag = sel.to(tl.int64)
    slot = tl.load(starts_ptr + pid) + tl.cumsum(flag, axis=0) - flag
    tl.store(indices_ptr + slot, offs, mask=sel)
    tl.store(values_ptr + slot, x, mask=sel)


def topk_filter(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """x: contiguous float32 / bfloat16 / float16, any shape.  Returns (values (c,), indices (c,) int64)."""
    if threshold != threshold:
        raise ValueError("topk_filter: threshold is NaN")
    flat = x.reshape(-1)
    n = flat.numel()
    blocks = triton.cdiv(n, BLOCK)
    counts = torch.empty(blocks, dtype=torch.int64, device=x.device)
    _count_kernel[(blocks,)](flat, n, threshold, counts, BLOCK=BLOCK)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if blocks else 0
    values = torch.empty(total, dtype=x.dtype, device=x.device)
    indices = torch.empty(total, dtype=torch.int64, device=x.device)
    if total:
        _write_kernel[(blocks,)](flat, n, threshold, ends - counts, values, indices, BLOCK=BLOCK)
    return values, indices
