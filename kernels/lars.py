"""Triton fused LARS / LARC step over all params (You et al. 2017, "Large Batch Training of Convolutional
Networks"; timm ``Lars`` conventions).

Reference (exact formulas): ``lars_step`` in pytrain/ops/lars.py.  Per tensor, in float32::

    tr = tc * |w| / (|g| + wd * |w| + eps)  (1 if |w| or |g| is 0);  tr = min(tr / lr, 1) if trust_clip
    d  = (g + wd * w) * tr  if adapt  else  g
    b  = d (init_buffers)  |  momentum * b + (1 - dampening) * d;   d = d + momentum * b if nesterov else b
    w  = w - lr * d

With adapt, three launches and no host sync: ``sumsq_partials`` (global_norm.py) writes per-block
partial |w|^2 and |g|^2, ``segment_sums`` adds them per tensor in a fixed order (deterministic), and the
update kernel reads the two sums of its tensor from device memory.  Without adapt, only the update runs.
Each launch covers all tensors (multi_tensor.py).
"""
from __future__ import annotations

from typing import List

import triton
import triton.language as tl
from torch import Tensor

from .global_norm import sumsq_partials
from .multi_tensor import block_coords, load, segment_sums, store, table, tensor_ptr, tl_dtype

LARS_CONFIG = {"BLOCK": 1024, "num_warps": 8}

# Rows of the address table (params and grads first: sumsq_partials reads the first two).
P, G, BUF = (tl.constexpr(i) for i in range(3))


@triton.jit
def _trust_ratio(sums, n_tensors, t, lr, weight_decay, trust_coefficient, eps, TRUST_CLIP: tl.constexpr):
    w_norm = tl.sqrt_rn(tl.load(sums + t))
    g_norm = tl.sqrt_rn(tl.load(sums + n_tensors + t))
    tr = tl.div_rn(trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps)
    tr = tl.where((w_norm > 0) & (g_norm > 0), tr, 1.0)
    if TRUST_CLIP:
        tr = tl.minimum(tl.div_rn(tr, lr), 1.0)
    return tr


@triton.jit
def _lars_block(addrs, n_tensors, t, start, n, sums, lr, momentum, one_minus_dampening, weight_decay,
                trust_coefficient, eps, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ADAPT: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, TRUST_CLIP: tl.constexpr, INIT: tl.constexpr,
                BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    p_ptr = tensor_ptr(addrs, n_tensors, P, t, DTYPE, ALIGNED)
    w = load(p_ptr, offs, n, MASKED)
    d = load(tensor_ptr(addrs, n_tensors, G, t, DTYPE, ALIGNED), offs, n, MASKED)
    if ADAPT:
        tr = _trust_ratio(sums, n_tensors, t, lr, weight_decay, trust_coefficient, eps, TRUST_CLIP)
        d = (d + weight_decay * w) * tr
    if MOMENTUM:
        b_ptr = tensor_ptr(addrs, n_tensors, BUF, t, DTYPE, ALIGNED)
        if INIT:
            b = d
        else:
            b = momentum * load(b_ptr, offs, n, MASKED) + one_minus_dampening * d
        store(b_ptr, offs, n, b, MASKED)
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
    store(p_ptr, offs, n, w - lr * d, MASKED)


@triton.jit
def _lars_kernel(addrs, blocks, numels, n_tensors, sums, lr, momentum, one_minus_dampening, weight_decay,
                 trust_coefficient, eps, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ADAPT: tl.constexpr,
                 MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, TRUST_CLIP: tl.constexpr, INIT: tl.constexpr,
                 BLOCK: tl.constexpr):
    t, start, n = block_coords(blocks, numels, BLOCK)
    if start + BLOCK <= n:
        _lars_block(addrs, n_tensors, t, start, n, sums, lr, momentum, one_minus_dampening, weight_decay,
                    trust_coefficient, eps, DTYPE, ALIGNED, ADAPT, MOMENTUM, NESTEROV, TRUST_CLIP, INIT, BLOCK, False)
    else:
        _lars_block(addrs, n_tensors, t, start, n, sums, lr, momentum, one_minus_dampening, weight_decay,
                    trust_coefficient, eps, DTYPE, ALIGNED, ADAPT, MOMENTUM, NESTEROV, TRUST_CLIP, INIT, BLOCK, True)


def lars_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], lr: float,
              momentum: float, dampening: float, weight_decay: float, trust_coefficient: float, eps: float,
              nesterov: bool, trust_clip: bool, adapt: bool, init_buffers: bool) -> None:
    """One LARS step in place over all params (arguments as ``pytrain.ops.lars.lars_step_reference``)."""
    if not params:
        return
    tab = table([params, grads, momentum_buffers if momentum != 0 else []], LARS_CONFIG["BLOCK"])
    if tab.n_blocks == 0:
        return
    dtype = tl_dtype(params)
    sums = segment_sums(sumsq_partials(tab, 2, dtype), tab.bounds, tab.n_tensors) if adapt else None  # |w|^2, |g|^2
    _lars_kernel[(tab.n_blocks,)](
        tab.addrs, tab.blocks, tab.numels, tab.n_tensors, sums, lr, momentum, 1.0 - dampening, weight_decay,
        trust_coefficient, eps, DTYPE=dtype, ALIGNED=tab.aligned, ADAPT=adapt, MOMENTUM=momentum != 0,
        NESTEROV=nesterov, TRUST_CLIP=trust_clip, INIT=init_buffers, BLOCK=tab.block,
        num_warps=LARS_CONFIG["num_warps"], enable_fp_fusion=False)
