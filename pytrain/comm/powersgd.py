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

from torch import Tensor

from ..ops.powersgd import EPS, orthogonalize_, powersgd_p, powersgd_q

__all__ = ["EPS", "orthogonalize_", "powersgd_compress", "powersgd_p", "powersgd_q"]


def powersgd_compress(M: Tensor, Q: Tensor, *, eps: float = EPS, impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One single-process PowerSGD step: P = orthogonalize(M Q), Q_new = M^T P.  Returns (P, Q_new).

    M (b, n, m) or (n, m); Q (b, m, r) or (m, r): the previous step's Q_new (warm start) or a random start.
    M ~ P Q_new^T is the rank-r approximation.
    """
    P = powersgd_p(M, Q, impl=impl)
    orthogonalize_(P, eps, impl=impl)
    return P, powersgd_q(M, P, impl=impl)
