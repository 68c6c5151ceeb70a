"""PowerSGD low-rank compression (Vogels et al. 2019), batched over same-shape gradient matrices.

One compression step of M (n x m) at rank r, with Q (m x r) from the previous step (warm start) or random:

    P = M Q                 powersgd_p(M, Q)       (all-reduced across ranks by the DDP hook)
    orthogonalize_(P)       Gram-Schmidt, in place
    Q = M^T P               powersgd_q(M, P)       (all-reduced across ranks by the DDP hook)

and the decompressed gradient is P Q^T.  ``powersgd_compress`` chains the three for one process; the DDP hook
(``pytrain.comm.hooks``) calls them one by one with its all-reduces in between, and keeps the error feedback.

Shapes: M (b, n, m) or (n, m); Q (b, m, r) or (m, r); P (b, n, r) or (n, r) (2-D in, 2-D out).  Every tensor
contiguous, on one device, one floating dtype; r <= min(n, m).  The compiled backends (C++ CPU, CUDA, Triton)
serve float32; other dtypes go to the reference.

Cost: P = M Q and Q = M^T P are skinny products, each one read of M (memory-bound: 2 * 4nm bytes per step in
float32); the CPU kernels read M exactly once per product (rows streamed, the r-column operand kept in cache).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.compress_ops import select

EPS = 1e-8  # Gram-Schmidt divides by (norm + EPS): a zero column stays zero, never NaN


def _check_tensor(op: str, name: str, t: Tensor, ref: Optional[Tensor]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"pytrain.comm.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"pytrain.comm.{op}: {name} has dtype {t.dtype}; a floating dtype is needed")
    if t.dim() not in (2, 3):
        raise ValueError(f"pytrain.comm.{op}: {name} must be 2-D or 3-D (batched), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"pytrain.comm.{op}: {name} is empty (shape {tuple(t.shape)})")
    if not t.is_contiguous():
        raise ValueError(f"pytrain.comm.{op}: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    if ref is not None:
        if t.dim() != ref.dim() or (t.dim() == 3 and t.shape[0] != ref.shape[0]):
            raise ValueError(f"pytrain.comm.{op}: {name} has shape {tuple(t.shape)}, M {tuple(ref.shape)} "
                             f"(both 2-D, or both 3-D with the same batch)")
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"pytrain.comm.{op}: {name} is {t.dtype} on {t.device}, M {ref.dtype} on {ref.device}")


def _check_pair(op: str, M: Tensor, name: str, other: Tensor, dim: int) -> None:
    """M and a skinny factor whose rows match M's dim ``dim`` (-1: Q, -2: P)."""
    _check_tensor(op, "M", M, None)
    _check_tensor(op, name, other, M)
    if other.shape[-2] != M.shape[dim]:
        raise ValueError(f"pytrain.comm.{op}: {name} has shape {tuple(other.shape)} but M {tuple(M.shape)}: "
                         f"{name} needs {M.shape[dim]} rows")
    if other.shape[-1] > min(M.shape[-2:]):
        raise ValueError(f"pytrain.comm.{op}: rank {other.shape[-1]} exceeds min(n, m) = {min(M.shape[-2:])}")


def powersgd_p(M: Tensor, Q: Tensor, *, impl: Optional[str] = None) -> Tensor:
    """P = M Q.  M (b, n, m) or (n, m), Q (b, m, r) or (m, r) -> P (b, n, r) or (n, r), M's dtype."""
    _check_pair("powersgd_p", M, "Q", Q, -1)
    return select("powersgd_p", M, impl).fn(M, Q)


def powersgd_q(M: Tensor, P: Tensor, *, impl: Optional[str] = None) -> Tensor:
    """Q = M^T P.  M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q (b, m, r) or (m, r), M's dtype."""
    _check_pair("powersgd_q", M, "P", P, -2)
    return select("powersgd_q", M, impl).fn(M, P)


def orthogonalize_(P: Tensor, eps: float = EPS, *, impl: Optional[str] = None) -> Tensor:
    """Orthonormalize the r columns of P (b, n, r) or (n, r) in place; returns P.

    Modified Gram-Schmidt, column by column: p_i /= (|p_i| + eps), then p_j -= (p_i . p_j) p_i for j > i.
    With eps > 0 a zero column stays zero instead of becoming NaN (a numerically dependent column turns into
    normalised rounding noise, finite), as in torch's ``powerSGD_hook`` with a non-zero
    ``orthogonalization_epsilon``.  NaN in P stays NaN.  Needs r <= n.
    """
    _check_tensor("orthogonalize_", "P", P, None)
    if P.shape[-1] > P.shape[-2]:
        raise ValueError(f"pytrain.comm.orthogonalize_: P {tuple(P.shape)} has more columns than rows")
    if not eps >= 0.0:
        raise ValueError(f"pytrain.comm.orthogonalize_: eps must be >= 0, got {eps!r}")
    select("orthogonalize", P, impl).fn(P, eps)
    return P


def powersgd_compress(M: Tensor, Q: Tensor, *, eps: float = EPS, impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One single-process PowerSGD step: P = orthogonalize(M Q), Q_new = M^T P.  Returns (P, Q_new).

    M (b, n, m) or (n, m); Q (b, m, r) or (m, r): the previous step's Q_new (warm start) or a random start.
    M ~ P Q_new^T is the rank-r approximation.
    """
    P = powersgd_p(M, Q, impl=impl)
    orthogonalize_(P, eps, impl=impl)
    return P, powersgd_q(M, P, impl=impl)
