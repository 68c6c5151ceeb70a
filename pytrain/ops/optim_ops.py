"""Fused optimizer ops: schemas, input checks and dispatch.

Ops (namespace ``pytrain``; the maths is in ``pytrain/testing/optim_ref.py``):

* ``adamw_step``: one AdamW step over lists of tensors (fp32/bf16/int8 states, fp32 masters, amsgrad).
* ``lars_step``: one LARS/LARC step (per-tensor trust ratios computed inside the op).
* ``lamb_step``: one LAMB step (per-tensor trust ratios computed inside the op).
* ``global_norm``: L2 norm over all elements of a list of tensors (float32 0-dim tensor).

Every tensor list holds one tensor per param, contiguous, on the params' device.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..testing import optim_ref
from .library import define_op
from .registry import registry

ADAMW_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] exp_avg_scales, "
    "Tensor(g!)[] exp_avg_sq_scales, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "int step, bool amsgrad, bool maximize, float grad_scale) -> ()"
)
LARS_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, float momentum, "
    "float dampening, float weight_decay, float trust_coefficient, float eps, bool nesterov, bool trust_clip, "
    "bool adapt, bool init_buffers) -> ()"
)
LAMB_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float lr, "
    "float beta1, float beta2, float beta3, float eps, float weight_decay, float bias_correction1, "
    "float bias_correction2, float grad_scale, bool adapt, bool trust_clip) -> ()"
)
GLOBAL_NORM_SCHEMA = "(Tensor[] tensors) -> Tensor"


def _no_output(*args, **kwargs) -> None:
    return None


def _global_norm_fake(tensors: List[Tensor]) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


define_op("adamw_step", ADAMW_SCHEMA, reference=optim_ref.adamw_step, fake=_no_output,
          triton="pytrain.kernels.adamw:adamw_step")
define_op("lars_step", LARS_SCHEMA, reference=optim_ref.lars_step, fake=_no_output,
          triton="pytrain.kernels.lars:lars_step")
define_op("lamb_step", LAMB_SCHEMA, reference=optim_ref.lamb_step, fake=_no_output,
          triton="pytrain.kernels.lamb:lamb_step")
define_op("global_norm", GLOBAL_NORM_SCHEMA, reference=optim_ref.global_norm, fake=_global_norm_fake,
          triton="pytrain.kernels.global_norm:global_norm")


# ----------------------------------------------------------------------------------------- input checks
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


def _select(op: str, params: List[Tensor], impl: Optional[str], **call):
    return registry(op).select(params[0].device, params[0].dtype, impl, **call)


# ------------------------------------------------------------------------------------------ public ops
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales,
               exp_avg_sq_scales, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: int, amsgrad: bool = False, maximize: bool = False, grad_scale: float = 1.0,
               impl: Optional[str] = None) -> None:
    """One fused AdamW step, in place, over N params (see ``optim_ref.adamw_step`` for shapes and maths)."""
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
    if quantized and amsgrad:
        raise ValueError("adamw_step: amsgrad is not supported with int8 states")
    if step < 1:
        raise ValueError(f"adamw_step: step must be >= 1 (the count after increment), got {step}")
    fn = _select("adamw_step", params, impl).fn
    fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, exp_avg_scales, exp_avg_sq_scales,
       lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize, grad_scale)


def lars_step(params, grads, momentum_buffers, *, lr: float, momentum: float, dampening: float,
              weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool, trust_clip: bool,
              adapt: bool, init_buffers: bool, impl: Optional[str] = None) -> None:
    """One fused LARS step, in place (see ``optim_ref.lars_step``)."""
    check_params("lars_step", params, grads)
    if not params:
        return
    check_states("lars_step", params, "momentum_buffers", momentum_buffers, params[0].dtype, momentum == 0)
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError("lars_step: momentum != 0 needs one momentum buffer per param")
    fn = _select("lars_step", params, impl).fn
    fn(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, trust_coefficient, eps, nesterov,
       trust_clip, adapt, init_buffers)


def lamb_step(params, grads, exp_avgs, exp_avg_sqs, *, lr: float, beta1: float, beta2: float, beta3: float,
              eps: float, weight_decay: float, bias_correction1: float, bias_correction2: float,
              grad_scale: float = 1.0, adapt: bool = True, trust_clip: bool = False,
              impl: Optional[str] = None) -> None:
    """One fused LAMB step, in place (see ``optim_ref.lamb_step``)."""
    check_params("lamb_step", params, grads)
    if not params:
        return
    check_states("lamb_step", params, "exp_avgs", exp_avgs, params[0].dtype, False)
    check_states("lamb_step", params, "exp_avg_sqs", exp_avg_sqs, params[0].dtype, False)
    fn = _select("lamb_step", params, impl).fn
    fn(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, beta3, eps, weight_decay, bias_correction1,
       bias_correction2, grad_scale, adapt, trust_clip)


def global_norm(tensors: List[Tensor], *, impl: Optional[str] = None) -> Tensor:
    """L2 norm of all elements of ``tensors`` (any shapes, one device and dtype) as a float32 0-dim tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    check_params("global_norm", tensors, tensors)
    return _select("global_norm", tensors, impl).fn(tensors)
