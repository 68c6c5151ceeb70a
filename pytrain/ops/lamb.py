"""LAMB step over lists of tensors: schema, fake, reference, checks and the public op.

LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"; timm
``Lamb`` conventions), per tensor::

    g   = grad * grad_scale                   (grad_scale = 1 / max(|G|/max_norm, 1))
    m   = beta1 * m + beta3 * g ;  v = beta2 * v + (1 - beta2) * g^2
    u   = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w
    tr  = |w| / |u|  (1 if either is 0; min(tr, 1) if trust_clip)   if adapt else 1
    w   = w - lr * tr * u

Backends: ``csrc/cpu/lamb.cpp``, ``csrc/cuda/lamb.cu``, ``kernels/lamb.py`` (per-tensor trust ratios
computed inside the op); the reference below is their contract.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .library import define_op
from .multi_tensor import StorageOrder, check_params, check_states, compute_dtype, fake_step, select, trust_ratio_or_one

LAMB_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float lr, "
    "float beta1, float beta2, float beta3, float eps, float weight_decay, float bias_correction1, "
    "float bias_correction2, float grad_scale, bool adapt, bool trust_clip) -> ()"
)


def lamb_step_reference(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    grad_scale: float,
    adapt: bool,
    trust_clip: bool,
) -> None:
    """One LAMB step, in place.  States are like params; grad_scale = 1 / global-norm clip factor."""
    bc2_sqrt = math.sqrt(bias_correction2)
    for i, p in enumerate(params):
        dt = compute_dtype(p)
        w, g = p.to(dt), grads[i].to(dt) * grad_scale
        m = beta1 * exp_avgs[i].to(dt) + beta3 * g
        v = beta2 * exp_avg_sqs[i].to(dt) + (1.0 - beta2) * g * g
        u = (m / bias_correction1) / (torch.sqrt(v) / bc2_sqrt + eps) + weight_decay * w
        tr = torch.ones((), dtype=dt)
        if adapt:
            w_norm, u_norm = w.norm(), u.norm()
            tr = trust_ratio_or_one(w_norm / u_norm, w_norm, u_norm)
            if trust_clip:
                tr = torch.clamp(tr, max=1.0)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        p.copy_(w - lr * tr * u)


def _triton(*args) -> None:
    from ..kernels.lamb import lamb_step as launch
    launch(*args)


def _fake(params, grads, exp_avgs, exp_avg_sqs, *rest) -> None:
    fake_step("lamb_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)


define_op("lamb_step", LAMB_SCHEMA, reference=lamb_step_reference, fake=_fake, triton=_triton)


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, *, lr: float, beta1: float, beta2: float, beta3: float,
              eps: float, weight_decay: float, bias_correction1: float, bias_correction2: float,
              grad_scale: float = 1.0, adapt: bool = True, trust_clip: bool = False,
              impl: Optional[str] = None) -> None:
    """One fused LAMB step, in place (shapes and maths: ``lamb_step_reference``; any strided layouts:
    ``multi_tensor.StorageOrder``)."""
    check_params("lamb_step", params, grads)
    if not params:
        return
    check_states("lamb_step", params, "exp_avgs", exp_avgs, params[0].dtype, False)
    check_states("lamb_step", params, "exp_avg_sqs", exp_avg_sqs, params[0].dtype, False)
    fn = select("lamb_step", params, impl).fn
    order = StorageOrder("lamb_step", params, dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs),
                         written=("params", "exp_avgs", "exp_avg_sqs"))
    fn(*order.lists.values(), lr, beta1, beta2, beta3, eps, weight_decay, bias_correction1,
       bias_correction2, grad_scale, adapt, trust_clip)
    order.write_back()


