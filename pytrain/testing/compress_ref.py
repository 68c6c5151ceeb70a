"""Plain-PyTorch references of the gradient-compression ops (float64-capable); every backend is held to them.

Top-k sparsification (Deep Gradient Compression, Lin et al. 2018) keeps the k entries of largest magnitude of a
flattened gradient.  The kernel every backend implements is the filtering pass

    topk_filter(x, t):  indices = { i : |x_i| >= t  or  x_i is NaN }  (ascending),  values = x_i at those indices

NaN ranks above every number (as in ``torch.topk``), so a NaN gradient is always sent and never silently dropped.
``|x_i| >= t`` is evaluated in float32 for float32 / bfloat16 / float16 inputs (exact: those widen to float32
without rounding) and in float64 for float64 inputs.

PowerSGD (Vogels et al. 2019) compresses a gradient matrix M (n x m) to rank r with one step of subspace
iteration:  P = M Q;  P = orthogonalize(P);  Q = M^T P.  The ops are batched over same-shape matrices:
M (b, n, m), Q (b, m, r), P (b, n, r).  ``orthogonalize`` is modified Gram-Schmidt on the r columns, dividing by
(norm + eps) as torch's ``powerSGD_hook`` does with a non-zero epsilon, so a zero column stays zero instead of
becoming NaN.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def _compare_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def selection_mask(x: Tensor, threshold: float) -> Tensor:
    """Boolean mask of ``x`` (any shape): |x| >= threshold or NaN, compared as ``topk_filter`` defines."""
    a = x.to(_compare_dtype(x.dtype)).abs()
    return (a >= threshold) | a.isnan()


def topk_filter(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
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


def powersgd_p(M: Tensor, Q: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), Q (b, m, r) or (m, r) -> P = M Q: (b, n, r) or (n, r)."""
    return torch.matmul(M, Q)


def powersgd_q(M: Tensor, P: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q = M^T P: (b, m, r) or (m, r)."""
    return torch.matmul(M.transpose(-2, -1), P)


def orthogonalize(P: Tensor, eps: float) -> None:
    """In place: modified Gram-Schmidt over the r columns of P (b, n, r) or (n, r).

    For i = 0..r-1:  p_i = p_i / (|p_i| + eps);  p_j = p_j - (p_i . p_j) p_i  for j > i.
    """
    mats = P if P.dim() == 3 else P.unsqueeze(0)
    for i in range(mats.shape[2]):
        col = mats[:, :, i : i + 1]
        col /= torch.linalg.vector_norm(col, dim=1, keepdim=True) + eps
        rest = mats[:, :, i + 1 :]
        rest -= (col * rest).sum(dim=1, keepdim=True) * col
