"""Gradient-compression ops: schemas and dispatch (public API in ``pytrain.comm``).

Ops (namespace ``pytrain``; maths in ``pytrain/testing/compress_ref.py``):

* ``topk_filter(x, threshold) -> (values, indices)``: every entry of x.flatten() with |x| >= threshold or NaN,
  in ascending index order (a data-dependent count).  float32 / bfloat16 / float16 (reference: also float64).
* ``powersgd_p(M, Q) -> P = M Q`` and ``powersgd_q(M, P) -> Q = M^T P``: M (b, n, m), Q (b, m, r), P (b, n, r).
* ``orthogonalize_(P, eps)``: in-place modified Gram-Schmidt on the columns of P (b, n, r).

The PowerSGD kernels serve float32 (the reference any floating dtype).  Every tensor is contiguous and
the checks live in ``pytrain.comm``; the C++ entry points check again.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..testing import compress_ref
from .library import define_op
from .registry import Implementation, registry

FILTER_SCHEMA = "(Tensor x, float threshold) -> (Tensor, Tensor)"
P_SCHEMA = "(Tensor M, Tensor Q) -> Tensor"
Q_SCHEMA = "(Tensor M, Tensor P) -> Tensor"
ORTHO_SCHEMA = "(Tensor(a!) P, float eps) -> ()"


def _filter_fake(x: Tensor, threshold: float):
    count = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(count), x.new_empty(count, dtype=torch.int64)


def _p_fake(M: Tensor, Q: Tensor) -> Tensor:
    return M.new_empty(M.shape[:-1] + Q.shape[-1:])


def _q_fake(M: Tensor, P: Tensor) -> Tensor:
    return M.new_empty(M.shape[:-2] + (M.shape[-1], P.shape[-1]))


def _no_output(*args) -> None:
    return None


def _float32_only(dtype: torch.dtype, **call) -> List[str]:
    return [] if dtype == torch.float32 else [f"the PowerSGD kernels serve float32 only, got {dtype}"]


define_op("topk_filter", FILTER_SCHEMA, reference=compress_ref.topk_filter, fake=_filter_fake,
          triton="pytrain.kernels.topk:topk_filter")
define_op("powersgd_p", P_SCHEMA, reference=compress_ref.powersgd_p, fake=_p_fake,
          triton="pytrain.kernels.powersgd:powersgd_p", declines=_float32_only)
define_op("powersgd_q", Q_SCHEMA, reference=compress_ref.powersgd_q, fake=_q_fake,
          triton="pytrain.kernels.powersgd:powersgd_q", declines=_float32_only)
define_op("orthogonalize", ORTHO_SCHEMA, reference=compress_ref.orthogonalize, fake=_no_output,
          triton="pytrain.kernels.powersgd:orthogonalize", declines=_float32_only)


def select(op: str, t: Tensor, impl: Optional[str]) -> Implementation:
    """The backend of ``op`` for tensor ``t`` (``impl`` forces one; see ``pytrain.ops.registry``)."""
    return registry(op).select(t.device, t.dtype, impl)
