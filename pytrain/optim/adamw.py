"""FusedAdamW: a drop-in for ``torch.optim.AdamW`` that updates every tensor of a group in one pass.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), with
torch.optim.AdamW's conventions (bias correction, eps outside the square root, amsgrad,
maximize); the per-element maths is in ``pytrain/ops/adamw.py``.

Extras over torch:
  * ``max_grad_norm``: global-norm clipping folded into the step (one norm pass, no
    rewrite of the gradients); a non-finite norm skips the step (``last_step_skipped``).
  * ``master_weights=True``: fp32 master copies of bf16/fp16 params; the kernel updates
    the master and writes the rounded param in the same pass.
  * ``state_dtype``: ``torch.float32`` (default), ``torch.bfloat16`` (4 bytes/param of
    state), or ``"int8"`` (2 bytes/param + one fp32 scale per 256 elements, like 8-bit
    Adam, Dettmers et al. 2022; see ``pytrain.ops.adamw`` for the format).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from ..ops import adamw as adamw_op
from ..ops.adamw import INT8_BLOCK
from ._base import FusedOptimizer

StateDtype = Union[torch.dtype, str]


class FusedAdamW(FusedOptimizer):
    """AdamW with a fused multi-tensor step (CPU C++, CUDA, Triton or reference backend).

    Args:
        params: iterable of tensors or param-group dicts (as torch.optim).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        max_grad_norm: clip gradients to this global L2 norm inside the step (None: no clipping).
        master_weights: keep fp32 masters for bf16/fp16 params.
        state_dtype: ``torch.float32``, ``torch.bfloat16`` or ``"int8"`` storage for the moments.
        impl: force a backend ("cpu", "cuda", "triton", "reference"); default: automatic.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False,
                 state_dtype: StateDtype = torch.float32, impl: Optional[str] = None):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0 or None)")
        if state_dtype not in (torch.float32, torch.bfloat16, "int8"):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (torch.float32, torch.bfloat16 or 'int8')")
        reasons = adamw_op.unsupported(quantized=state_dtype == "int8", amsgrad=amsgrad)
        if reasons:
            raise ValueError(f"FusedAdamW: {'; '.join(reasons)} (state_dtype={state_dtype!r}, amsgrad={amsgrad})")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        float_state = torch.float32 if state_dtype == "int8" else state_dtype
        self.state_dtypes = {"exp_avg": float_state, "exp_avg_sq": float_state, "max_exp_avg_sq": float_state,
                             "master_param": torch.float32, "exp_avg_scale": torch.float32,
                             "exp_avg_sq_scale": torch.float32}
        super().__init__(params, defaults, impl)

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if state:
            return state
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if self.state_dtype == "int8":
            blocks = (p.numel() + INT8_BLOCK - 1) // INT8_BLOCK
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.int8, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
            state["exp_avg_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["exp_avg_sq_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            state["master_param"] = p.detach().float().contiguous()
        return state

    def _step(self) -> None:
        grad_scale = self._begin_step(self.max_grad_norm)
        if grad_scale is None:
            return
        for group in self.param_groups:
            params = self._params_with_grads(group)
            for p in params:
                self._init_state(p, group["amsgrad"])
            buckets = self.bucket(params, lambda p: (int(self.state[p]["step"]), "master_param" in self.state[p]))
            for (_, _, (step, _)), bucket in buckets.items():
                self._update(group, bucket, step + 1, grad_scale)

    def _update(self, group: dict, params: list, step: int, grad_scale: float) -> None:
        states = [self.state[p] for p in params]
        for s in states:
            s["step"] += 1

        def collect(key):
            return [s[key] for s in states if key in s]

        beta1, beta2 = group["betas"]
        ops.adamw_step(
            params, [p.grad for p in params], collect("exp_avg"), collect("exp_avg_sq"), collect("max_exp_avg_sq"),
            collect("master_param"), collect("exp_avg_scale"), collect("exp_avg_sq_scale"),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=step, amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=grad_scale, impl=self.impl)
