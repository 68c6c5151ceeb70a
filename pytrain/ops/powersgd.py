"""PowerSGD's three kernels (Vogels et al. 2019): schemas, fakes, references, checks and the public ops.

PowerSGD (Vogels et al. 2019) compresses a gradient matrix M (n x m) to rank r with one step of subspace
iteration:  P = M Q;  P = orthogonalize(P);  Q = M^T P.  The ops are batched over same-shape matrices:
M (b, n, m), Q (b, m, r), P (b, n, r).  ``orthogonalize`` is modified Gram-Schmidt on the r columns, dividing by
(norm + eps) as torch's ``powerSGD_hook`` does with a non-zero epsilon, so a zero column stays zero instead of
becoming NaN.

Backends: ``csrc/cpu/powersgd.cpp``, ``csrc/cuda/powersgd.cu``, ``kernels/powersgd.py`` (float32; other
dtypes go to the reference).  ``pytrain.comm.powersgd`` chains them; the DDP hook all-reduces in between.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .library import define_op
from .registry import registry

P_SCHEMA = "(Tensor M, Tensor Q) -> Tensor"
Q_SCHEMA = "(Tensor M, Tensor P) -> Tensor"
ORTHO_SCHEMA = "(Tensor(a!) P, float eps) -> ()"
EPS = 1e-8  # Gram-Schmidt divides by (norm + EPS): a zero column stays zero, never NaN


# ------------------------------------------------------------------------------------------ references
def powersgd_p_reference(M: Tensor, Q: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), Q (b, m, r) or (m, r) -> P = M Q: (b, n, r) or (n, r)."""
    return torch.matmul(M, Q)


def powersgd_q_reference(M: Tensor, P: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q = M^T P: (b, m, r) or (m, r)."""
    return torch.matmul(M.transpose(-2, -1), P)


def orthogonalize_reference(P: Tensor, eps: float) -> None:
    """In place: modified Gram-Schmidt over the r columns of P (b, n, r) or (n, r).

    For i = 0..r-1:  p_i = p_i / (|p_i| + eps);  p_j = p_j - (p_i . p_j) p_i  for j > i.
    """
    mats = P if P.dim() == 3 else P.unsqueeze(0)
    for i in range(mats.shape[2]):
        col = mats[:, :, i : i + 1]
        col /= torch.linalg.vector_norm(col, dim=1, keepdim=True) + eps
        rest = mats[:, :, i + 1 :]
        rest -= (col * rest).sum(dim=1, keepdim=True) * col


# ------------------------------------------------------------------------------------------ ops
def _p_fake(M: Tensor, Q: Tensor) -> Tensor:
    torch._check(M.dim() == Q.dim() and Q.shape[-2] == M.shape[-1],
                 lambda: f"powersgd_p: M {tuple(M.shape)}, Q {tuple(Q.shape)}")
    return M.new_empty(M.shape[:-1] + Q.shape[-1:])


def _q_fake(M: Tensor, P: Tensor) -> Tensor:
    torch._check(M.dim() == P.dim() and P.shape[-2] == M.shape[-2],
                 lambda: f"powersgd_q: M {tuple(M.shape)}, P {tuple(P.shape)}")
    return M.new_empty(M.shape[:-2] + (M.shape[-1], P.shape[-1]))


def _ortho_fake(P: Tensor, eps: float) -> None:
    torch._check(P.dim() in (2, 3), lambda: f"orthogonalize: P must be 2-D or 3-D, got {tuple(P.shape)}")


def _float32_only(dtype: torch.dtype, **call) -> List[str]:
    return [] if dtype == torch.float32 else [f"the PowerSGD kernels serve float32 only, got {dtype}"]


def _triton_p(M: Tensor, Q: Tensor) -> Tensor:
    from ..kernels.powersgd import powersgd_p as launch
    return launch(M, Q)


def _triton_q(M: Tensor, P: Tensor) -> Tensor:
    from ..kernels.powersgd import powersgd_q as launch
    return launch(M, P)


def _triton_orthogonalize(P: Tensor, eps: float) -> None:
    from ..kernels.powersgd import orthogonalize as launch
    launch(P, eps)


define_op("powersgd_p", P_SCHEMA, reference=powersgd_p_reference, fake=_p_fake, triton=_triton_p,
          declines=_float32_only)
define_op("powersgd_q", Q_SCHEMA, reference=powersgd_q_reference, fake=_q_fake, triton=_triton_q,
          declines=_float32_only)
define_op("orthogonalize", ORTHO_SCHEMA, reference=orthogonalize_reference, fake=_ortho_fake,
          triton=_triton_orthogonalize, declines=_float32_only)


# ------------------------------------------------------------------------------------------ public
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
    return registry("powersgd_p").select(M.device, M.dtype, impl).fn(M, Q)


def powersgd_q(M: Tensor, P: Tensor, *, impl: Optional[str] = None) -> Tensor:
    """Q = M^T P.  M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q (b, m, r) or (m, r), M's dtype."""
    _check_pair("powersgd_q", M, "P", P, -2)
    return registry("powersgd_q").select(M.device, M.dtype, impl).fn(M, P)


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
    registry("orthogonalize").select(P.device, P.dtype, impl).fn(P, eps)
    return P
