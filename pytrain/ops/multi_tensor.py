"""What the multi-tensor ops (adamw_step, lars_step, lamb_step, global_norm) share on the Python side:
the checks of their tensor lists, the arithmetic dtype of their references and backend selection.

Twin of ``kernels/multi_tensor.py`` (Triton address tables) and ``csrc/cpu/multi_tensor.h`` /
``csrc/cuda/multi_tensor.cuh`` (the C++ engines).  Every tensor list holds one tensor per param,
contiguous, on the params' device.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .registry import Implementation, registry


def compute_dtype(t: Tensor) -> torch.dtype:
    """References compute in float32 for float32 / bfloat16 / float16 tensors, in float64 for float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fake_step(op: str, params: List[Tensor], **lists: List[Tensor]) -> None:
    """Fake of an in-place step: states the shape contract (one tensor per param, each shaped like it)
    for ``torch.compile`` and ``opcheck``; nothing is returned."""
    for name, tensors in lists.items():
        if not tensors:
            continue
        torch._check(len(tensors) == len(params), lambda: f"{op}: {name} has {len(tensors)} tensors, "
                                                          f"expected {len(params)}")
        for p, t in zip(params, tensors):
            torch._check(t.shape == p.shape, lambda: f"{op}: {name} shaped {tuple(t.shape)}, param {tuple(p.shape)}")


def trust_ratio_or_one(ratio: Tensor, w_norm: Tensor, d_norm: Tensor) -> Tensor:
    """LARS / LAMB trust ratio, 1 where either norm is 0."""
    ok = (w_norm > 0) & (d_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def check_params(op: str, params: List[Tensor], grads: List[Tensor]) -> None:
    """Params and grads: same count, one device, one floating dtype, dense, contiguous, same shapes."""
    if len(params) != len(grads):
        raise ValueError(f"{op}: {len(params)} params but {len(grads)} grads")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{op}: params[{i}] has dtype {p.dtype}; only real floating-point params are supported")
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{op}: grads[{i}] is sparse ({g.layout}); fused optimizers need dense gradients")
        if p.device != device or g.device != device:
            raise RuntimeError(f"{op}: params[{i}] / grads[{i}] are on {p.device} / {g.device}, but params[0] is "
                               f"on {device}; put one device per param group (or let the optimizer group them)")
        if p.dtype != dtype or g.dtype != dtype:
            raise TypeError(f"{op}: params[{i}] / grads[{i}] have dtype {p.dtype} / {g.dtype}, expected {dtype}")
        if p.shape != g.shape:
            raise ValueError(f"{op}: grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(p.shape)}")
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"{op}: params[{i}] and grads[{i}] must be contiguous")


def check_states(op: str, params: List[Tensor], name: str, states: List[Tensor], dtype: Optional[torch.dtype],
                 may_be_empty: bool = True) -> None:
    if may_be_empty and not states:
        return
    if len(states) != len(params):
        raise ValueError(f"{op}: {name} has {len(states)} tensors, expected {len(params)} (one per param)")
    for i, (p, s) in enumerate(zip(params, states)):
        if s.device != p.device or not s.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] must be contiguous and on {p.device}")
        if dtype is not None and s.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {s.dtype}, expected {dtype}")


def select(op: str, params: List[Tensor], impl: Optional[str], **call) -> Implementation:
    """The backend of ``op`` for the device and dtype of ``params`` (``impl`` forces one)."""
    return registry(op).select(params[0].device, params[0].dtype, impl, **call)
