"""Global L2 norm over a list of tensors (the norm gradient clipping needs): schema, fake, reference, public op.

    global_norm([t_1 .. t_N]) = sqrt(sum_i sum_j t_ij^2)     (float32 0-dim; float64 for the float64 reference)

Overflow and underflow.  The norm must be right for every finite input whose norm is finite in the
result's dtype: squares of float32 values above ~1.8e19 overflow float32 and those below ~1e-23 underflow
to 0, so a float32 sum of squares reads finite gradients as inf (a skipped step) or as 0.  Every backend
therefore sums the squares of float32 / bfloat16 / float16 values in float64, where they can neither
overflow (3.4e38^2 < 1.8e308) nor underflow (1.4e-45^2 > 4.9e-324, the smallest float64 subnormal,
and far above it for normals), and rounds the square root once to float32.  The reference does the same; for
float64 inputs, whose squares can overflow float64, it first scales by the power of two nearest max|t|
(exact), then sums the scaled squares: norm = 2^e * sqrt(sum (t * 2^-e)^2).  A norm beyond float32's
range is inf in a float32 result, as it must be; NaN or inf elements give NaN or inf.

Backends: ``csrc/cpu/global_norm.cpp``, ``csrc/cuda/global_norm.cu``, ``kernels/global_norm.py`` (one
pass over memory, float64 partial sums per block, then one reduction in a fixed order).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .library import define_op
from .multi_tensor import StorageOrder, check_params, compute_dtype, select

GLOBAL_NORM_SCHEMA = "(Tensor[] tensors) -> Tensor"


def _global_norm_fake(tensors: List[Tensor]) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


def global_norm_reference(tensors: List[Tensor]) -> Tensor:
    """L2 norm over all elements of all tensors, as a float32 0-dim tensor (float64 inputs: float64);
    computed in float64, power-of-two scaled (module docstring: no overflow, no underflow)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    out_dtype = compute_dtype(tensors[0])
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if flat.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=tensors[0].device)
    amax = flat.abs().max()
    if not torch.isfinite(amax) or amax == 0:  # inf / NaN propagate; all zeros give 0
        return torch.sqrt((flat * flat).sum()).to(out_dtype)
    exponent = torch.frexp(amax).exponent  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    scaled = torch.ldexp(flat, -exponent)  # exact: |scaled| <= 1
    return (torch.ldexp(torch.sqrt((scaled * scaled).sum()), exponent)).to(out_dtype)


def _triton(tensors: List[Tensor]) -> Tensor:
    from ..kernels.global_norm import global_norm as launch
    return launch(tensors)


define_op("global_norm", GLOBAL_NORM_SCHEMA, reference=global_norm_reference, fake=_global_norm_fake, triton=_triton)


def global_norm(tensors: List[Tensor], *, impl: Optional[str] = None) -> Tensor:
    """L2 norm of all elements of ``tensors`` (any shapes, one device and dtype) as a float32 0-dim tensor."""
    check_params("global_norm", tensors, None, name="tensors")
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    fn = select("global_norm", tensors, impl).fn
    return fn(StorageOrder("global_norm", tensors, {"tensors": tensors}, written=()).lists["tensors"])
