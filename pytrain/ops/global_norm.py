"""Global L2 norm over a list of tensors (the norm gradient clipping needs): schema, fake, reference, public op.

    global_norm([t_1 .. t_N]) = sqrt(sum_i sum_j t_ij^2)     (float32 0-dim; float64 for the float64 reference)

Backends: ``csrc/cpu/global_norm.cpp``, ``csrc/cuda/global_norm.cu``, ``kernels/global_norm.py`` (one
pass over memory, partial sums per block, then one reduction).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .library import define_op
from .multi_tensor import check_params, compute_dtype, select

GLOBAL_NORM_SCHEMA = "(Tensor[] tensors) -> Tensor"


def _global_norm_fake(tensors: List[Tensor]) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


def global_norm_reference(tensors: List[Tensor]) -> Tensor:
    """L2 norm over all elements of all tensors, as a float32 0-dim tensor (float64 inputs: float64)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    dtype = compute_dtype(tensors[0])
    total = sum(t.detach().to(dtype).pow(2).sum() for t in tensors)
    return torch.sqrt(total)


def _triton(tensors: List[Tensor]) -> Tensor:
    from ..kernels.global_norm import global_norm as launch
    return launch(tensors)


define_op("global_norm", GLOBAL_NORM_SCHEMA, reference=global_norm_reference, fake=_global_norm_fake, triton=_triton)


def global_norm(tensors: List[Tensor], *, impl: Optional[str] = None) -> Tensor:
    """L2 norm of all elements of ``tensors`` (any shapes, one device and dtype) as a float32 0-dim tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    check_params("global_norm", tensors, tensors)
    return select("global_norm", tensors, impl).fn(tensors)
