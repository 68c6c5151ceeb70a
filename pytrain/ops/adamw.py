"""AdamW step over lists of tensors: schema, fake, reference, checks and the public op.

AdamW (Loshchilov & Hutter 2019; torch.optim.AdamW semantics), per element::

    g   = grad * grad_scale                  (grad_scale: global-norm clip factor)
    g   = -g                                  if maximize
    w   = w * (1 - lr * weight_decay)
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g^2
    vm  = max(vm, v)                          if amsgrad (vm used instead of v below)
    w   = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

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

Backends: ``csrc/cpu/adamw.cpp``, ``csrc/cuda/adamw.cu``, ``kernels/adamw.py``; the reference below is
the contract they are tested against (arithmetic in float32, float64 for float64 tensors, element by
element in the kernels' order, so backends agree to rounding).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .library import define_op
from .multi_tensor import StorageOrder, check_params, check_states, compute_dtype, fake_step, select

INT8_BLOCK = 256  # elements per int8 / uint8 state scale

ADAMW_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] exp_avg_scales, "
    "Tensor(g!)[] exp_avg_sq_scales, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "Tensor[] steps, bool amsgrad, bool maximize, float grad_scale) -> ()"
)


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


def adamw_step_reference(
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
    steps: List[Tensor],
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
    steps: N one-element CPU tensors, the step number t >= 1 of each param after increment.
    """
    quantized = len(exp_avg_scales) > 0
    for i, (p, step) in enumerate(zip(params, step_counts(steps, len(params)))):
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
        step_size = lr / (1.0 - beta1**step)
        dt = compute_dtype(p)
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


def step_counts(steps: List[Tensor], n: int) -> List[float]:
    """The step number of each of ``n`` params, read on the host from ``steps`` (one-element CPU tensors,
    as ``torch.optim``'s ``state["step"]``) and checked; what the reference and Triton backends step with
    (the C++ kernels read and check them alike, ``csrc/adamw_checks.h``)."""
    if len(steps) != n:
        raise ValueError(f"adamw_step: steps has {len(steps)} tensors, expected {n} (one per param)")
    counts = []
    for t in steps:
        if t.numel() != 1 or t.device.type != "cpu" or t.is_complex():
            raise ValueError(f"adamw_step: each step must be a one-element real CPU tensor, got shape "
                             f"{tuple(t.shape)}, dtype {t.dtype} on {t.device}")
        counts.append(float(t))
    reasons = [r for c in counts for r in unsupported(quantized=False, amsgrad=False, step=c)]
    if reasons:
        raise ValueError("adamw_step: " + reasons[0])
    return counts


def unsupported(*, quantized: bool, amsgrad: bool, step: float = 1) -> List[str]:
    """Why a step with these settings cannot run (empty when it can): the rules every backend shares."""
    reasons = []
    if quantized and amsgrad:
        reasons.append("amsgrad is not supported with int8 states")
    if step < 1:
        reasons.append(f"step must be >= 1 (the count after increment), got {step:g}")
    return reasons


def _triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
            exp_avg_sq_scales, lr, beta1, beta2, eps, weight_decay, steps, amsgrad, maximize, grad_scale) -> None:
    from ..kernels.adamw import adamw_step as launch
    launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales, exp_avg_sq_scales,
           lr, beta1, beta2, eps, weight_decay, step_counts(steps, len(params)), amsgrad, maximize, grad_scale,
           int8_block=INT8_BLOCK)


def _fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, *rest) -> None:
    fake_step("adamw_step", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
              max_exp_avg_sqs=max_exp_avg_sqs, master_params=master_params)


define_op("adamw_step", ADAMW_SCHEMA, reference=adamw_step_reference, fake=_fake, triton=_triton)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
               exp_avg_sq_scales, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: Union[int, Sequence[Tensor]], amsgrad: bool = False, maximize: bool = False, grad_scale: float = 1.0,
               impl: Optional[str] = None) -> None:
    """One fused AdamW step, in place, over N params (shapes and maths: ``adamw_step_reference``).

    Any strided layouts: each param is stepped in its storage order (``multi_tensor.StorageOrder``), so the
    int8 blocks of a channels_last param are runs of 256 elements in memory.

    ``step``: the step number t >= 1 after increment, an int for all params or one one-element CPU tensor
    per param (the optimizer's ``state["step"]``, as torch's fused AdamW takes them): the kernels read the
    tensors, so ``torch.compile`` captures the step without reading its value (no graph break, no recompile)."""
    check_params("adamw_step", params, grads)
    if not params:
        return
    quantized = bool(exp_avg_scales)
    state_dtype = exp_avgs[0].dtype if exp_avgs else None
    check_states("adamw_step", params, "exp_avgs", exp_avgs, torch.int8 if quantized else state_dtype, False)
    check_states("adamw_step", params, "exp_avg_sqs", exp_avg_sqs, torch.uint8 if quantized else state_dtype, False)
    check_states("adamw_step", params, "max_exp_avg_sqs", max_exp_avg_sqs, state_dtype)
    check_states("adamw_step", params, "master_params", master_params, torch.float32)
    check_states("adamw_step", params, "exp_avg_scales", exp_avg_scales, torch.float32)
    check_states("adamw_step", params, "exp_avg_sq_scales", exp_avg_sq_scales, torch.float32, not quantized)
    if amsgrad != bool(max_exp_avg_sqs):
        raise ValueError("adamw_step: amsgrad=True needs max_exp_avg_sqs (and amsgrad=False an empty list)")
    if isinstance(step, bool) or not isinstance(step, (int, list, tuple)):
        raise TypeError(f"adamw_step: step must be an int or a list of one-element tensors, got {type(step).__name__}")
    reasons = unsupported(quantized=quantized, amsgrad=amsgrad, step=step if isinstance(step, int) else 1)
    if reasons:
        raise ValueError("adamw_step: " + "; ".join(reasons))
    fn = select("adamw_step", params, impl).fn
    order = StorageOrder("adamw_step", params, dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                                      max_exp_avg_sqs=max_exp_avg_sqs, master_params=master_params),
                         written=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"))
    steps = [torch.tensor(step, dtype=torch.float64)] * len(params) if isinstance(step, int) else list(step)
    fn(*order.lists.values(), exp_avg_scales, exp_avg_sq_scales, lr, beta1, beta2, eps, weight_decay, steps, amsgrad,
       maximize, grad_scale)
    order.write_back()


