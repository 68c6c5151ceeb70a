"""PowerSGD's three kernels (Vogels et al. 2019): schemas, fakes, references, checks and the public ops.

PowerSGD (Vogels et al. 2019) compresses a gradient matrix M (n x m) to rank r with one step of subspace
iteration:  P = M Q;  P = orthogonalize(P);  Q = M^T P.  The ops are batched over same-shape matrices:
M (b, n, m), Q (b, m, r), P (b, n, r).

``orthogonalize`` (per matrix p, n x r, r <= n) is Gram-Schmidt robust to rank deficiency:

    s = max_j |p_j|                                         the input's scale (column norms before any change)
    for i = 0..r-1, with U = [u_0 .. u_{i-1}] the finished columns:
        v = p_i;  v -= U (U^T v) -> v1;  v1 -= U (U^T v1) -> v   classical Gram-Schmidt, twice ("twice is enough")
        if (|v| <= eps * s or |v| < |v1| / 2) and s finite:     numerically dependent (or zero) column:
            j = argmin_row |U[row, :]|^2 (first such row)   the unit vector e_j furthest from span(U):
            v = e_j;  v -= U (U^T v);  v -= U (U^T v)       |v|^2 >= 1 - i / n > 0
        u_i = v / |v|

The output always has orthonormal columns (to rounding) whose span holds the input's columns, so for a gradient
M of rank k < r the PowerSGD approximation P (M^T P)^T = P P^T M stays exact: this is the contract torch's hook
meets with its QR (Householder's extra columns are also orthonormal directions outside the data).  Projecting twice
matters: after one pass a dependent column is rounding noise that still leans on the earlier columns, and
normalising it (what one-pass modified Gram-Schmidt does) makes P P^T a non-projector and the approximation wrong
(relative error 0.1-0.8 on a rank-2 gradient at rank 4).  Twice is enough unless the second pass still removes
much (|v| < |v1| / 2): then v1 was rounding noise lying mostly in span(U), and v would not be orthogonal to
working precision, so such a column counts as dependent too.  A zero P gives the first r columns of the identity, as
LAPACK's QR does, so a zero gradient never freezes the warm-started Q at zero.  eps is relative to the scale s
(default ``EPS`` = 1e-8, below float32 rounding: a direction above the rounding noise is always kept, as QR keeps
it; a column at the noise level is normalised noise orthogonal to U, which keeps P P^T M exact as well); a
non-finite P stays non-finite (NaN / inf never turn into clean columns).

Backends: ``csrc/cpu/powersgd.cpp``, ``csrc/cuda/powersgd.cu``, ``kernels/powersgd.py`` (float32; other
dtypes go to the reference).  ``pytrain.comm.powersgd`` chains them; the DDP hook all-reduces in between.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .library import define_op
from .registry import registry

P_SCHEMA = "(Tensor M, Tensor Q) -> Tensor"
Q_SCHEMA = "(Tensor M, Tensor P) -> Tensor"
ORTHO_SCHEMA = "(Tensor(a!) P, float eps) -> ()"
EPS = 1e-8  # a column left with a norm <= EPS * (largest input column norm) after projection is dependent


# ------------------------------------------------------------------------------------------ references
def powersgd_p_reference(M: Tensor, Q: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), Q (b, m, r) or (m, r) -> P = M Q: (b, n, r) or (n, r)."""
    return torch.matmul(M, Q)


def powersgd_q_reference(M: Tensor, P: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q = M^T P: (b, m, r) or (m, r)."""
    return torch.matmul(M.transpose(-2, -1), P)


def _project_out_twice(v: Tensor, U: Tensor) -> Tuple[Tensor, Tensor]:
    """v (b, n, 1) -= U (U^T v), twice; U (b, n, i) with orthonormal columns.  Returns |v| after each pass (b,)."""
    norms = []
    for _ in range(2):
        v -= U @ (U.transpose(1, 2) @ v)
        norms.append(torch.linalg.vector_norm(v, dim=(1, 2)))
    return norms[0], norms[1]


def orthogonalize_reference(P: Tensor, eps: float) -> None:
    """In place: the columns of P (b, n, r) or (n, r) made orthonormal, robust to rank deficiency (module docstring)."""
    mats = P if P.dim() == 3 else P.unsqueeze(0)
    scale = torch.linalg.vector_norm(mats, dim=1).amax(dim=1)  # (b,)
    limit = torch.where(torch.isfinite(scale), eps * scale, -1.0)  # -1: nothing is replaced in a non-finite matrix
    for i in range(mats.shape[2]):
        U, v = mats[:, :, :i], mats[:, :, i : i + 1]
        first, norm = _project_out_twice(v, U)
        dependent = ((norm <= limit) | (norm < first / 2)) & (limit >= 0)
        for mat in dependent.nonzero().view(-1).tolist():
            row = int(U[mat].pow(2).sum(dim=1).argmin()) if i else 0
            v[mat].zero_()[row] = 1.0
            norm[mat] = _project_out_twice(v[mat : mat + 1], U[mat : mat + 1])[1][0]
        v /= norm.view(-1, 1, 1)


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


def _float32_only(device: torch.device, dtype: torch.dtype) -> List[str]:
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

    Gram-Schmidt twice per column; a column whose norm after removing the earlier ones is <= eps times the largest
    input column norm, or that the second pass halves (dependent, or zero), is replaced by the unit vector e_j furthest from the earlier columns,
    orthogonalised against them (see the module docstring).  The result always has orthonormal columns spanning
    the input's columns, so P P^T M is exact for a rank-deficient M.  eps: finite, in [0, 1) (relative).
    A non-finite P stays non-finite.  Needs r <= n.
    """
    _check_tensor("orthogonalize_", "P", P, None)
    if P.shape[-1] > P.shape[-2]:
        raise ValueError(f"pytrain.comm.orthogonalize_: P {tuple(P.shape)} has more columns than rows")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"pytrain.comm.orthogonalize_: eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"pytrain.comm.orthogonalize_: eps must be finite and in [0, 1) (relative to the largest "
                         f"column norm), got {eps!r}")
    registry("orthogonalize").select(P.device, P.dtype, impl).fn(P, eps)
    return P
