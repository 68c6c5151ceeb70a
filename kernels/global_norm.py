"""Triton global L2 norm of a list of tensors: sqrt(sum over all tensors and elements of x^2), float32.

Reference: ``global_norm`` in pytrain/ops/global_norm.py.  Used for gradient clipping; the result is a
device tensor (no host sync here).

Two launches, deterministic (no atomics): ``_sumsq_kernel`` writes one partial sum of squares per block
of every tensor (one launch for all tensors, see multi_tensor.py), then ``segment_sums`` adds the partials
in a fixed order and takes the square root.  The global norm squares and sums in float64 (``ACC``), so
finite float32 values can neither overflow (above ~1.8e19 their float32 squares are inf) nor underflow
(below ~1e-23 their float32 squares are 0); the float64 root is rounded once to float32.  Memory-bound, so
the float64 arithmetic costs no time.  ``sumsq_partials`` is shared with LARS (per-tensor |w|, |g|, float32).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import Table, block_coords, load, segment_sums, table, tensor_ptr, tl_dtype

SUMSQ_CONFIG = {"BLOCK": 4096, "num_warps": 8}


@triton.jit
def _sumsq_block(addrs, n_tensors, t, start, n, partials, n_blocks, pid, K: tl.constexpr, DTYPE: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    for k in tl.static_range(K):
        x = load(tensor_ptr(addrs, n_tensors, k, t, DTYPE, ALIGNED), offs, n, MASKED).to(partials.dtype.element_ty)
        tl.store(partials + k * n_blocks + pid, tl.sum(x * x, axis=0))


@triton.jit
def _sumsq_kernel(addrs, blocks, numels, n_tensors, partials, n_blocks, K: tl.constexpr, DTYPE: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """partials[k, b] = sum of x^2 over block b of the table, for the first K lists of the table, in the
    partials' dtype (float32 or float64)."""
    t, start, n = block_coords(blocks, numels, BLOCK)
    pid = tl.program_id(0)
    if start + BLOCK <= n:
        _sumsq_block(addrs, n_tensors, t, start, n, partials, n_blocks, pid, K, DTYPE, ALIGNED, BLOCK, False)
    else:
        _sumsq_block(addrs, n_tensors, t, start, n, partials, n_blocks, pid, K, DTYPE, ALIGNED, BLOCK, True)


def sumsq_partials(tab: Table, k: int, dtype, acc: torch.dtype = torch.float32) -> Tensor:
    """(k, n_blocks) per-block sums of squares of the first ``k`` lists of ``tab`` (element type ``dtype``),
    computed and returned in ``acc`` (float32 or float64)."""
    partials = torch.empty((k, tab.n_blocks), dtype=acc, device=tab.addrs.device)
    _sumsq_kernel[(tab.n_blocks,)](tab.addrs, tab.blocks, tab.numels, tab.n_tensors, partials, tab.n_blocks,
                                   K=k, DTYPE=dtype, ALIGNED=tab.aligned, BLOCK=tab.block,
                                   num_warps=SUMSQ_CONFIG["num_warps"])
    return partials


def global_norm(tensors: List[Tensor]) -> Tensor:
    """L2 norm of all elements of ``tensors`` (one device and dtype) as a float32 0-dim tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    tab = table([tensors], SUMSQ_CONFIG["BLOCK"])
    if tab.n_blocks == 0:
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    partials = sumsq_partials(tab, 1, tl_dtype(tensors), acc=torch.float64)
    return segment_sums(partials, tab.whole, 1, sqrt=True).reshape(())
