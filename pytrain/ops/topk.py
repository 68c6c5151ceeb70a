"""Top-k filtering, the kernel of top-k gradient compression: schema, fake, reference and the public op.

Top-k sparsification (Deep Gradient Compression, Lin et al. 2018) keeps the k entries of largest magnitude of a
flattened gradient.  The kernel every backend implements is the filtering pass

    topk_filter(x, t):  indices = { i : |x_i| >= t  or  x_i is NaN }  (ascending),  values = x_i at those indices

NaN ranks above every number (as in ``torch.topk``), so a NaN gradient is always sent and never silently dropped.
``|x_i| >= t`` is evaluated in float32 for float32 / bfloat16 / float16 inputs (exact: those widen to float32
without rounding) and in float64 for float64 inputs.

Backends: ``csrc/cpu/topk.cpp``, ``csrc/cuda/topk.cu``, ``kernels/topk.py`` (float32 / bfloat16 / float16;
the reference also float64).  ``pytrain.comm.topk`` picks the threshold and calls ``topk_filter``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .library import define_op
from .registry import registry

FILTER_SCHEMA = "(Tensor x, float threshold) -> (Tensor, Tensor)"


def _compare_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selection_mask(x: Tensor, threshold: float) -> Tensor:
    """Boolean mask of ``x`` (any shape): |x| >= threshold or NaN, compared as ``topk_filter`` defines."""
    a = x.to(_compare_dtype(x.dtype)).abs()
    return (a >= threshold) | a.isnan()


def topk_filter_reference(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """x: any shape.  Returns (values (c,) in x's dtype, indices (c,) int64 into x.flatten(), ascending)."""
    if threshold != threshold:
        raise ValueError("topk_filter: threshold is NaN")
    flat = x.reshape(-1)
    indices = selection_mask(flat, threshold).nonzero().reshape(-1)
    return flat[indices], indices


def topk_exact(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k entries of largest |x| over x.flatten() (NaN first), as torch.topk picks them: (values, indices)."""
    flat = x.reshape(-1)
    indices = torch.topk(flat.abs(), k, sorted=False).indices
    return flat[indices], indices


def _filter_fake(x: Tensor, threshold: float):
    count = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(count), x.new_empty(count, dtype=torch.int64)


def _triton(x: Tensor, threshold: float):
    from ..kernels.topk import topk_filter as launch
    return launch(x, threshold)


define_op("topk_filter", FILTER_SCHEMA, reference=topk_filter_reference, fake=_filter_fake, triton=_triton)


def topk_filter(x: Tensor, threshold: float, *, impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Entries of contiguous ``x`` with |x| >= threshold or NaN: (values (c,), indices (c,) int64, ascending)."""
    return registry("topk_filter").select(x.device, x.dtype, impl).fn(x, threshold)
