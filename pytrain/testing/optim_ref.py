"""Plain-PyTorch references for the fused optimizer ops.

These functions have exactly the signatures of the ``pytrain::*_step`` ops
(see ``pytrain/ops/optim_ops.py``) and are registered as the ``reference``
implementation of each op.  Every backend (CPU C++, CUDA C++, Triton) is tested
against them, and they are tested against ``torch.optim`` / timm in float64.

Arithmetic is done in float32 for float32/bfloat16/float16 tensors and in
float64 for float64 tensors, element by element in the same order as the
kernels, so backends agree to rounding.

AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW semantics), per element::

    g   = grad * grad_scale                  (grad_scale: global-norm clip factor)
    g   = -g                                  if maximize
    w   = w * (1 - lr * weight_decay)
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g^2
    vm  = max(vm, v)                          if amsgrad (vm used instead of v below)
    w   = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"; timm
``Lars`` conventions), per tensor::

    tr  = tc * |w| / (|g| + wd * |w| + eps)   (1 if |w| == 0 or |g| == 0)
    tr  = min(tr / lr, 1)                     if trust_clip (LARC)
    d   = (g + wd * w) * tr                   if adapt (wd != 0 or always_adapt) else g
    b   = d  (first step)  |  momentum * b + (1 - dampening) * d
    d   = d + momentum * b  if nesterov  else  b          (when momentum != 0)
    w   = w - lr * d

LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"; timm
``Lamb`` conventions), per tensor::

    g   = grad * grad_scale                   (grad_scale = 1 / max(|G|/max_norm, 1))
    m   = beta1 * m + beta3 * g ;  v = beta2 * v + (1 - beta2) * g^2
    u   = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w
    tr  = |w| / |u|  (1 if either is 0; min(tr, 1) if trust_clip)   if adapt else 1
    w   = w - lr * tr * u

Compact AdamW states (``state_dtype``):
  * ``bfloat16``: m, v (and the amsgrad max) stored in bfloat16, rounded to nearest even.
  * ``int8``: blocks of ``INT8_BLOCK`` = 256 consecutive elements of each tensor
    (the last block partial).  m is stored as int8 ``q_m = rint(m / s_m)`` with
    ``s_m = max|m| / 127``; the second moment as uint8 codes of ``r = sqrt(v)``
    on a grid that excludes zero, ``r = (q_r + 1) * s_r`` with
    ``s_r = max(r) / 256`` and ``q_r = clamp(rint(r / s_r) - 1, 0, 255)``, so a
    dequantized denominator is never zero inside a non-zero block (the
    "zero-point problem" of Li et al. 2023, "Memory Efficient Optimizers with
    4-bit States").  The update itself uses the unquantized new m and v of the
    step; only storage is quantized.  Scales are float32, one per block.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

INT8_BLOCK = 256


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(x: Tensor) -> Tensor:
    """View a flat tensor as (nblocks, INT8_BLOCK), zero-padding the last block."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % INT8_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, INT8_BLOCK)


def dequantize_m(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 first-moment codes + per-block scales -> values shaped like ``q``."""
    vals = _blocks(q.to(dtype)) * scale.to(dtype)[:, None]
    return vals.reshape(-1)[: q.numel()].view(q.shape)


def dequantize_v(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 second-moment codes + per-block scales -> v (not sqrt(v)); zero where the block scale is 0."""
    r = (_blocks(q.to(dtype)) + 1) * scale.to(dtype)[:, None]
    return (r * r).reshape(-1)[: q.numel()].view(q.shape)


def quantize_m(m: Tensor, q_out: Tensor, scale_out: Tensor) -> None:
    """Blockwise symmetric int8 quantization of the first moment, written into q_out / scale_out."""
    b = _blocks(m)
    scale = b.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(b / safe[:, None]), -127, 127)
    q_out.copy_(q.reshape(-1)[: m.numel()].view(q_out.shape))
    scale_out.copy_(scale)


def quantize_v(v: Tensor, q_out: Tensor, scale_out: Tensor) -> None:
    """Blockwise uint8 quantization of sqrt(v) on the zero-free grid (see module docstring)."""
    r = _blocks(torch.sqrt(v))
    scale = r.amax(dim=1) / 256.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(r / safe[:, None]) - 1, 0, 255)
    q_out.copy_(q.reshape(-1)[: v.numel()].view(q_out.shape))
    scale_out.copy_(scale)


def global_norm(tensors: List[Tensor]) -> Tensor:
    """L2 norm over all elements of all tensors, as a float32 0-dim tensor (float64 inputs: float64)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    dtype = _compute_dtype(tensors[0])
    total = sum(t.detach().to(dtype).pow(2).sum() for t in tensors)
    return torch.sqrt(total)


def adamw_step(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    master_params: List[Tensor],
    exp_avg_scales: List[Tensor],
    exp_avg_sq_scales: List[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    amsgrad: bool,
    maximize: bool,
    grad_scale: float,
) -> None:
    """One AdamW step over lists of tensors, in place.

    params: N tensors of any shape (float32/bfloat16/float16/float64).
    grads: like params.  master_params: [] or N float32 tensors (then params are
    a rounded copy of the masters and the update is computed on the masters).
    exp_avgs / exp_avg_sqs: like params in the state dtype (float32 or bfloat16),
    or int8 / uint8 codes with exp_avg_scales / exp_avg_sq_scales of shape
    (ceil(numel / 256),) float32.  max_exp_avg_sqs: [] or like exp_avg_sqs (amsgrad).
    step: the step number t >= 1 after increment.
    """
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bc1
    quantized = len(exp_avg_scales) > 0
    for i, p in enumerate(params):
        dt = _compute_dtype(p)
        w = (master_params[i] if master_params else p).to(dt)
        g = grads[i].to(dt) * grad_scale
        if maximize:
            g = -g
        if quantized:
            m = dequantize_m(exp_avgs[i], exp_avg_scales[i], dt)
            v = dequantize_v(exp_avg_sqs[i], exp_avg_sq_scales[i], dt)
        else:
            m, v = exp_avgs[i].to(dt), exp_avg_sqs[i].to(dt)
        w = w * (1.0 - lr * weight_decay)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(dt), v)
            max_exp_avg_sqs[i].copy_(vmax)
            denom = torch.sqrt(vmax) / bc2_sqrt + eps
        else:
            denom = torch.sqrt(v) / bc2_sqrt + eps
        w = w - step_size * m / denom
        if quantized:
            quantize_m(m, exp_avgs[i], exp_avg_scales[i])
            quantize_v(v, exp_avg_sqs[i], exp_avg_sq_scales[i])
        else:
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
        if master_params:
            master_params[i].copy_(w)
        p.copy_(w)


def _ratio_or_one(num: Tensor, w_norm: Tensor, d_norm: Tensor) -> Tensor:
    ok = (w_norm > 0) & (d_norm > 0)
    return torch.where(ok, num, torch.ones_like(num))


def lars_step(
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
        dt = _compute_dtype(p)
        w, g = p.to(dt), grads[i].to(dt)
        d = g
        if adapt:
            w_norm, g_norm = w.norm(), g.norm()
            tr = _ratio_or_one(trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps), w_norm, g_norm)
            if trust_clip:
                tr = torch.clamp(tr / lr, max=1.0)
            d = (g + weight_decay * w) * tr
        if momentum != 0:
            buf = d if init_buffers else momentum * momentum_buffers[i].to(dt) + (1.0 - dampening) * d
            momentum_buffers[i].copy_(buf)
            d = d + momentum * buf if nesterov else buf
        p.copy_(w - lr * d)


def lamb_step(
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
        dt = _compute_dtype(p)
        w, g = p.to(dt), grads[i].to(dt) * grad_scale
        m = beta1 * exp_avgs[i].to(dt) + beta3 * g
        v = beta2 * exp_avg_sqs[i].to(dt) + (1.0 - beta2) * g * g
        u = (m / bias_correction1) / (torch.sqrt(v) / bc2_sqrt + eps) + weight_decay * w
        tr = torch.ones((), dtype=dt)
        if adapt:
            w_norm, u_norm = w.norm(), u.norm()
            tr = _ratio_or_one(w_norm / u_norm, w_norm, u_norm)
            if trust_clip:
                tr = torch.clamp(tr, max=1.0)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        p.copy_(w - lr * tr * u)
