"""Triton fused LAMB step over all params (You et al. 2020, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes"; timm ``Lamb`` conventions).

Reference (exact formulas): ``lamb_step`` in pytrain/ops/lamb.py.  Per element, in float32::

    g = grad * grad_scale;  m = beta1 * m + beta3 * g;  v = beta2 * v + (1 - beta2) * g^2
    u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * w
    w = w - lr * tr * u,   tr = |w| / |u| per tensor (1 if either is 0; min(tr, 1) if trust_clip; 1 unless adapt)

With adapt, three launches and no host sync: pass 1 (``_lamb_norms_kernel``) computes the step's m, v
and u, stores nothing but per-block partial |w|^2 and |u|^2; ``segment_sums`` adds them per tensor in a
fixed order (deterministic); pass 2 (``_lamb_update_kernel``) recomputes m, v, u from the same inputs,
stores m and v and updates w.  Storing m, v in pass 1 and reading them back in pass 2 would save one
read of the grad (about 10% of the traffic) but is not the reference with bfloat16/float16 params,
whose states have the params' dtype: u from rounded states differs, and where float16 v underflows to 0
(small grads) u blows up to m / eps.  Without adapt, pass 2 alone does the whole step.  Each launch
covers all tensors (multi_tensor.py).
"""
from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import block_coords, load, segment_sums, store, table, tensor_ptr, tl_dtype

LAMB_CONFIG = {"BLOCK": 1024, "num_warps": 8}

# Rows of the address table: the op's tensor lists, in argument order.
P, G, M, V = (tl.constexpr(i) for i in range(4))


@triton.jit
def _step_values(addrs, n_tensors, t, offs, n, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
                 bias_correction1, bc2_sqrt, grad_scale, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 MASKED: tl.constexpr):
    """(w, new m, new v, u) of elements ``offs`` of tensor ``t``; u is 0 past the end when MASKED."""
    w = load(tensor_ptr(addrs, n_tensors, P, t, DTYPE, ALIGNED), offs, n, MASKED)
    g = load(tensor_ptr(addrs, n_tensors, G, t, DTYPE, ALIGNED), offs, n, MASKED) * grad_scale
    m = beta1 * load(tensor_ptr(addrs, n_tensors, M, t, DTYPE, ALIGNED), offs, n, MASKED) + beta3 * g
    v = beta2 * load(tensor_ptr(addrs, n_tensors, V, t, DTYPE, ALIGNED), offs, n, MASKED) + one_minus_beta2 * g * g
    u = tl.div_rn(tl.div_rn(m, bias_correction1), tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps) + weight_decay * w
    if MASKED:  # past the end u is 0 / eps, or NaN when eps == 0
        u = tl.where(offs < n, u, 0.0)
    return w, m, v, u


@triton.jit
def _norms_block(addrs, n_tensors, t, start, n, partials, n_blocks, beta1, beta2, beta3, one_minus_beta2, eps,
                 weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    w, m, v, u = _step_values(addrs, n_tensors, t, offs, n, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
                              bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, MASKED)
    pid = tl.program_id(0)
    tl.store(partials + pid, tl.sum(w * w, axis=0))
    tl.store(partials + n_blocks + pid, tl.sum(u * u, axis=0))


@triton.jit
def _lamb_norms_kernel(addrs, blocks, numels, n_tensors, partials, n_blocks, beta1, beta2, beta3, one_minus_beta2,
                       eps, weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 (read only): partials[:, b] = (|w|^2, |u|^2) over block b."""
    t, start, n = block_coords(blocks, numels, BLOCK)
    if start + BLOCK <= n:
        _norms_block(addrs, n_tensors, t, start, n, partials, n_blocks, beta1, beta2, beta3, one_minus_beta2, eps,
                     weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, BLOCK, False)
    else:
        _norms_block(addrs, n_tensors, t, start, n, partials, n_blocks, beta1, beta2, beta3, one_minus_beta2, eps,
                     weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, BLOCK, True)


@triton.jit
def _trust_ratio(sums, n_tensors, t, TRUST_CLIP: tl.constexpr):
    w_norm = tl.sqrt_rn(tl.load(sums + t))
    u_norm = tl.sqrt_rn(tl.load(sums + n_tensors + t))
    tr = tl.where((w_norm > 0) & (u_norm > 0), tl.div_rn(w_norm, u_norm), 1.0)
    if TRUST_CLIP:
        tr = tl.minimum(tr, 1.0)
    return tr


@triton.jit
def _update_block(addrs, n_tensors, t, start, n, sums, lr, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
                  bias_correction1, bc2_sqrt, grad_scale, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                  ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    w, m, v, u = _step_values(addrs, n_tensors, t, offs, n, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
                              bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, MASKED)
    if ADAPT:
        lr = lr * _trust_ratio(sums, n_tensors, t, TRUST_CLIP)
    store(tensor_ptr(addrs, n_tensors, M, t, DTYPE, ALIGNED), offs, n, m, MASKED)
    store(tensor_ptr(addrs, n_tensors, V, t, DTYPE, ALIGNED), offs, n, v, MASKED)
    store(tensor_ptr(addrs, n_tensors, P, t, DTYPE, ALIGNED), offs, n, w - lr * u, MASKED)


@triton.jit
def _lamb_update_kernel(addrs, blocks, numels, n_tensors, sums, lr, beta1, beta2, beta3, one_minus_beta2, eps,
                        weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE: tl.constexpr,
                        ALIGNED: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: m, v and w updated in place; with ADAPT, lr scaled by the trust ratio of sums[:, t] = (|w|^2, |u|^2)."""
    t, start, n = block_coords(blocks, numels, BLOCK)
    if start + BLOCK <= n:
        _update_block(addrs, n_tensors, t, start, n, sums, lr, beta1, beta2, beta3, one_minus_beta2, eps,
                      weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, ADAPT, TRUST_CLIP, BLOCK,
                      False)
    else:
        _update_block(addrs, n_tensors, t, start, n, sums, lr, beta1, beta2, beta3, one_minus_beta2, eps,
                      weight_decay, bias_correction1, bc2_sqrt, grad_scale, DTYPE, ALIGNED, ADAPT, TRUST_CLIP, BLOCK,
                      True)


def lamb_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
              lr: float, beta1: float, beta2: float, beta3: float, eps: float, weight_decay: float,
              bias_correction1: float, bias_correction2: float, grad_scale: float, adapt: bool,
              trust_clip: bool) -> None:
    """One LAMB step in place over all params (arguments as ``pytrain.ops.lamb.lamb_step_reference``)."""
    if not params:
        return
    tab = table([params, grads, exp_avgs, exp_avg_sqs], LAMB_CONFIG["BLOCK"])
    if tab.n_blocks == 0:
        return
    dtype, grid, num_warps = tl_dtype(params), (tab.n_blocks,), LAMB_CONFIG["num_warps"]
    moments = (beta1, beta2, beta3, 1.0 - beta2, eps, weight_decay, bias_correction1, math.sqrt(bias_correction2),
               grad_scale)
    sums = None
    if adapt:
        partials = torch.empty((2, tab.n_blocks), dtype=torch.float32, device=params[0].device)
        _lamb_norms_kernel[grid](tab.addrs, tab.blocks, tab.numels, tab.n_tensors, partials, tab.n_blocks, *moments,
                                 DTYPE=dtype, ALIGNED=tab.aligned, BLOCK=tab.block, num_warps=num_warps,
                                 enable_fp_fusion=False)
        sums = segment_sums(partials, tab.bounds, tab.n_tensors)
    _lamb_update_kernel[grid](tab.addrs, tab.blocks, tab.numels, tab.n_tensors, sums, lr, *moments, DTYPE=dtype,
                              ALIGNED=tab.aligned, ADAPT=adapt, TRUST_CLIP=trust_clip, BLOCK=tab.block,
                              num_warps=num_warps, enable_fp_fusion=False)
