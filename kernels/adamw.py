"""Triton fused AdamW step over all params in one launch (one pass over memory).

Reference (the exact per-element formulas and the int8 state format): ``adamw_step`` in
pytrain/ops/adamw.py; Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization".
Per element, in float32::

    g = grad * grad_scale (negated if maximize);  w = w * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2;  vmax = max(vmax, v) if amsgrad
    w = w - lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)

Variants are constexpr flags, so each compiled kernel contains only its own path: param dtype
(float32/bfloat16/float16), state dtype (float32/bfloat16) or int8 states (QUANT: int8 m and uint8
sqrt(v) codes with one float32 scale per 256-element block), float32 masters (MASTER_W), AMSGRAD, MAXIMIZE.

A program works on a (ROWS, 256) tile: one row per int8 block, so the int8 requantization (absmax of
each row) stays inside the program.  Divisions and square roots are IEEE-rounded (div_rn, sqrt_rn) and
FMA contraction is off (both free in a memory-bound kernel), so results are the reference's operation by
operation (float32/float16 params are bit-exact against it in the interpreter, except where torch's
vectorized CPU sqrt is 1 ulp off the correctly rounded one; then int8 codes may differ at rare ties).
"""
from __future__ import annotations

import math
from typing import List

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import block_coords, load, store, table, tensor_ptr, tl_dtype

ADAMW_CONFIG = {"ROWS": 4, "num_warps": 8}  # 1024 elements per program, 4 per thread

# Rows of the address table: the op's tensor lists, in argument order.
P, G, M, V, VMAX, MASTER, M_SCALE, V_SCALE = (tl.constexpr(i) for i in range(8))


@triton.jit
def round_half_even(x):
    """rint(x) for |x| < 2^31 (libdevice.rint is unavailable under TRITON_INTERPRET=1)."""
    f = tl.floor(x)
    d = x - f
    odd = (f.to(tl.int32) & 1) == 1
    return f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)


@triton.jit
def _adamw_block(addrs, n_tensors, t, start, n, decay, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 bc2_sqrt, eps, grad_scale, PARAM: tl.constexpr, STATE: tl.constexpr, MASTER_W: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, QUANT: tl.constexpr, ALIGNED: tl.constexpr,
                 ROWS: tl.constexpr, QBLOCK: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, ROWS)
    offs = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    p_ptr = tensor_ptr(addrs, n_tensors, P, t, PARAM, ALIGNED)
    g = load(tensor_ptr(addrs, n_tensors, G, t, PARAM, ALIGNED), offs, n, MASKED) * grad_scale
    if MAXIMIZE:
        g = -g
    if MASTER_W:
        w_ptr = tensor_ptr(addrs, n_tensors, MASTER, t, tl.float32, ALIGNED)
    else:
        w_ptr = p_ptr
    w = load(w_ptr, offs, n, MASKED)
    if QUANT:
        m_ptr = tensor_ptr(addrs, n_tensors, M, t, tl.int8, ALIGNED)
        v_ptr = tensor_ptr(addrs, n_tensors, V, t, tl.uint8, ALIGNED)
        ms_ptr = tensor_ptr(addrs, n_tensors, M_SCALE, t, tl.float32, ALIGNED)
        vs_ptr = tensor_ptr(addrs, n_tensors, V_SCALE, t, tl.float32, ALIGNED)
        scale_offs = start // QBLOCK + rows
        n_scales = (n + QBLOCK - 1) // QBLOCK
        m = load(m_ptr, offs, n, MASKED) * load(ms_ptr, scale_offs, n_scales, MASKED)[:, None]
        r = (load(v_ptr, offs, n, MASKED) + 1.0) * load(vs_ptr, scale_offs, n_scales, MASKED)[:, None]
        v = r * r
    else:
        m_ptr = tensor_ptr(addrs, n_tensors, M, t, STATE, ALIGNED)
        v_ptr = tensor_ptr(addrs, n_tensors, V, t, STATE, ALIGNED)
        m = load(m_ptr, offs, n, MASKED)
        v = load(v_ptr, offs, n, MASKED)

    w = w * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax_ptr = tensor_ptr(addrs, n_tensors, VMAX, t, STATE, ALIGNED)
        vmax = tl.maximum(load(vmax_ptr, offs, n, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        store(vmax_ptr, offs, n, vmax, MASKED)
        r = tl.sqrt_rn(vmax)
    else:
        r = tl.sqrt_rn(v)
    w = w - tl.div_rn(step_size * m, tl.div_rn(r, bc2_sqrt) + eps)

    if QUANT:
        if MASKED:  # the zero padding of the last int8 block must not enter its absmax
            valid = offs < n
            m = tl.where(valid, m, 0.0)
            r = tl.where(valid, r, 0.0)
        m_scale = tl.div_rn(tl.max(tl.abs(m), axis=1), 127.0)
        m_safe = tl.where(m_scale > 0, m_scale, 1.0)
        qm = tl.clamp(round_half_even(tl.div_rn(m, m_safe[:, None])), -127.0, 127.0)
        v_scale = tl.div_rn(tl.max(r, axis=1), 256.0)
        v_safe = tl.where(v_scale > 0, v_scale, 1.0)
        qv = tl.clamp(round_half_even(tl.div_rn(r, v_safe[:, None])) - 1.0, 0.0, 255.0)
        store(m_ptr, offs, n, qm, MASKED)
        store(v_ptr, offs, n, qv, MASKED)
        store(ms_ptr, scale_offs, n_scales, m_scale, MASKED)
        store(vs_ptr, scale_offs, n_scales, v_scale, MASKED)
    else:
        store(m_ptr, offs, n, m, MASKED)
        store(v_ptr, offs, n, v, MASKED)
    if MASTER_W:
        store(w_ptr, offs, n, w, MASKED)
    store(p_ptr, offs, n, w, MASKED)


@triton.jit
def _adamw_kernel(addrs, blocks, numels, n_tensors, decay, step_size, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, bc2_sqrt, eps, grad_scale, PARAM: tl.constexpr, STATE: tl.constexpr,
                  MASTER_W: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, QUANT: tl.constexpr,
                  ALIGNED: tl.constexpr, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    t, start, n = block_coords(blocks, numels, ROWS * QBLOCK)
    if start + ROWS * QBLOCK <= n:
        _adamw_block(addrs, n_tensors, t, start, n, decay, step_size, beta1, one_minus_beta1, beta2,
                     one_minus_beta2, bc2_sqrt, eps, grad_scale, PARAM, STATE, MASTER_W, AMSGRAD, MAXIMIZE, QUANT,
                     ALIGNED, ROWS, QBLOCK, False)
    else:
        _adamw_block(addrs, n_tensors, t, start, n, decay, step_size, beta1, one_minus_beta1, beta2,
                     one_minus_beta2, bc2_sqrt, eps, grad_scale, PARAM, STATE, MASTER_W, AMSGRAD, MAXIMIZE, QUANT,
                     ALIGNED, ROWS, QBLOCK, True)


def adamw_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], master_params: List[Tensor], exp_avg_scales: List[Tensor],
               exp_avg_sq_scales: List[Tensor], lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, steps: List[float], amsgrad: bool, maximize: bool, grad_scale: float, *,
               int8_block: int) -> None:
    """One AdamW step in place over all params (arguments as ``pytrain.ops.adamw.adamw_step_reference``, but
    ``steps``: the step numbers, read and checked by the caller; ``int8_block``: elements per int8 state
    scale, ``pytrain.ops.adamw.INT8_BLOCK``).  One launch per distinct step number (one in training, unless
    some params missed steps)."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
             exp_avg_sq_scales]
    for step in sorted(set(steps)):
        at_step = [i for i, s in enumerate(steps) if s == step]
        _launch([[ts[i] for i in at_step] if ts else [] for ts in lists], lr, beta1, beta2, eps, weight_decay,
                step, amsgrad, maximize, grad_scale, int8_block)


def _launch(lists: List[List[Tensor]], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
            step: float, amsgrad: bool, maximize: bool, grad_scale: float, int8_block: int) -> None:
    """One launch over the params of ``lists`` (the op's lists in argument order), all at step ``step``."""
    params, exp_avgs, master_params, exp_avg_scales = lists[0], lists[2], lists[5], lists[6]
    rows, num_warps = ADAMW_CONFIG["ROWS"], ADAMW_CONFIG["num_warps"]
    tab = table(lists, rows * int8_block)
    if tab.n_blocks == 0:
        return
    # Scalars are formed in double as in the reference, then passed (rounded) as float32.
    _adamw_kernel[(tab.n_blocks,)](
        tab.addrs, tab.blocks, tab.numels, tab.n_tensors, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step),
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), eps, grad_scale,
        PARAM=tl_dtype(params), STATE=tl_dtype(exp_avgs), MASTER_W=bool(master_params), AMSGRAD=amsgrad,
        MAXIMIZE=maximize, QUANT=bool(exp_avg_scales), ALIGNED=tab.aligned, ROWS=rows, QBLOCK=int8_block,
        num_warps=num_warps,
        enable_fp_fusion=False)
