"""LARS / LARC step over lists of tensors: schema, fake, reference, checks and the public op.

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"; timm
``Lars`` conventions), per tensor::

    tr  = tc * |w| / (|g| + wd * |w| + eps)   (1 if |w| == 0 or |g| == 0)
    tr  = min(tr / lr, 1)                     if trust_clip (LARC)
    d   = (g + wd * w) * tr                   if adapt (wd != 0 or always_adapt) else g
    b   = d  (first step)  |  momentum * b + (1 - dampening) * d
    d   = d + momentum * b  if nesterov  else  b          (when momentum != 0)
    w   = w - lr * d

Every backend computes the per-tensor norms and trust ratios inside the op, in one launch for the whole
list: ``csrc/cpu/lars.cpp``, ``csrc/cuda/lars.cu`` and ``kernels/lars.py`` are held to the reference below.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .library import define_op
from .multi_tensor import StorageOrder, check_params, check_states, compute_dtype, fake_step, select, trust_ratio_or_one

LARS_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, float momentum, "
    "float dampening, float weight_decay, float trust_coefficient, float eps, bool nesterov, bool trust_clip, "
    "bool adapt, bool init_buffers) -> ()"
)


def lars_step_reference(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    adapt: bool,
    init_buffers: bool,
) -> None:
    """One LARS step, in place.  momentum_buffers: [] when momentum == 0, else like params;
    init_buffers: True on the first step (buffers are overwritten with the update)."""
    for i, p in enumerate(params):
        dt = compute_dtype(p)
        w, g = p.to(dt), grads[i].to(dt)
        d = g
        if adapt:
            w_norm, g_norm = w.norm(), g.norm()
            tr = trust_ratio_or_one(trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps), w_norm, g_norm)
            if trust_clip:
                tr = torch.clamp(tr / lr, max=1.0)
            d = (g + weight_decay * w) * tr
        if momentum != 0:
            buf = d if init_buffers else momentum * momentum_buffers[i].to(dt) + (1.0 - dampening) * d
            momentum_buffers[i].copy_(buf)
            d = d + momentum * buf if nesterov else buf
        p.copy_(w - lr * d)


def _triton(*args) -> None:
    from ..kernels.lars import lars_step as launch
    launch(*args)


def _fake(params, grads, momentum_buffers, *rest) -> None:
    fake_step("lars_step", params, grads=grads, momentum_buffers=momentum_buffers)


define_op("lars_step", LARS_SCHEMA, reference=lars_step_reference, fake=_fake, triton=_triton)


def lars_step(params, grads, momentum_buffers, *, lr: float, momentum: float, dampening: float,
              weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool, trust_clip: bool,
              adapt: bool, init_buffers: bool, impl: Optional[str] = None) -> None:
    """One fused LARS step, in place (shapes and maths: ``lars_step_reference``; any strided layouts:
    ``multi_tensor.StorageOrder``)."""
    check_params("lars_step", params, grads)
    if not params:
        return
    check_states("lars_step", params, "momentum_buffers", momentum_buffers, params[0].dtype, momentum == 0)
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError("lars_step: momentum != 0 needs one momentum buffer per param")
    fn = select("lars_step", params, impl).fn
    order = StorageOrder("lars_step", params, dict(params=params, grads=grads, momentum_buffers=momentum_buffers),
                         written=("params", "momentum_buffers"))
    fn(*order.lists.values(), lr, momentum, dampening, weight_decay, trust_coefficient, eps, nesterov,
       trust_clip, adapt, init_buffers)
    order.write_back()


