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
from ..ops.multi_tensor import storage_perm
from ._base import FusedOptimizer
from .hyperparameters import check_max_grad_norm

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

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False,
                 state_dtype: StateDtype = torch.float32, impl: Optional[str] = None):
        check_max_grad_norm(max_grad_norm)
        if state_dtype not in (torch.float32, torch.bfloat16, "int8"):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (torch.float32, torch.bfloat16 or 'int8')")
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, impl)

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        super()._check_hyperparameters(group, where)
        reasons = adamw_op.unsupported(quantized=self.state_dtype == "int8", amsgrad=group["amsgrad"])
        if reasons:
            raise ValueError(f"FusedAdamW: {'; '.join(reasons)} (state_dtype={self.state_dtype!r}, "
                             f"amsgrad={group['amsgrad']}, {where})")

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        """Float moments: the ``state_dtype`` setting, but float64 params keep float64 moments under the
        float32 default (float32 moments would make a float64 run drift from torch.optim.AdamW)."""
        float_state = torch.float32 if self.state_dtype == "int8" else self.state_dtype
        return torch.float64 if p.dtype == torch.float64 and float_state == torch.float32 else float_state

    def _state_dtype(self, key: str, param: Tensor) -> Optional[torch.dtype]:
        if key in ("master_param", "exp_avg_scale", "exp_avg_sq_scale"):
            return torch.float32
        if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            return self._moment_dtype(param)  # int8 codes are not floating: they keep their dtype
        return None

    #: int8 block scales belong to the local shard of a DTensor param (``_sharded``); ``_portable_state`` converts
    shard_local_states = ("exp_avg_scale", "exp_avg_sq_scale")

    def _convert_state(self, p: Tensor, state: dict) -> dict:
        """A loaded state in this optimizer's format: float moments quantized to int8 codes for
        ``state_dtype="int8"``, int8 codes dequantized for a float ``state_dtype`` (then as ``_moment_dtype``).
        Blocks are runs of 256 elements in the param's storage order, as ``adamw_step`` steps them."""
        if "exp_avg" not in state:
            return state
        quantized = not state["exp_avg"].is_floating_point()
        if self.state_dtype == "int8" and not quantized:  # (amsgrad groups were refused before loading)
            state.pop("max_exp_avg_sq", None)
            codes = self._zero_states(p, amsgrad=False)
            frame = self._int8_frame(p)
            adamw_op.quantize_m(frame(state["exp_avg"]).float(), frame(codes["exp_avg"]), codes["exp_avg_scale"])
            adamw_op.quantize_v(frame(state["exp_avg_sq"]).float(), frame(codes["exp_avg_sq"]),
                                codes["exp_avg_sq_scale"])
            return {**state, **codes}
        if self.state_dtype != "int8" and quantized:
            return self._portable_state(p, state)
        return state

    def _portable_state(self, p: Tensor, state: dict) -> dict:
        """``state`` with int8 codes and their block scales replaced by fp32 moments (``_moment_dtype`` for a
        float ``state_dtype``): the form a sharded checkpoint saves, as its blocks depend on the shard."""
        if "exp_avg_scale" not in state:
            return state
        state = dict(state)
        moments = self._zero_states(p, amsgrad=False, dtype=torch.float32 if self.state_dtype == "int8" else None)
        frame = self._int8_frame(p)
        frame(moments["exp_avg"]).copy_(
            adamw_op.dequantize_m(frame(state.pop("exp_avg")), state.pop("exp_avg_scale"), torch.float32))
        frame(moments["exp_avg_sq"]).copy_(
            adamw_op.dequantize_v(frame(state.pop("exp_avg_sq")), state.pop("exp_avg_sq_scale"), torch.float32))
        return {**state, **moments}

    @staticmethod
    def _int8_frame(p: Tensor):
        """t -> the elements of ``t`` (shaped like ``p``) in the order adamw_step's int8 blocks follow."""
        perm = storage_perm(p) or tuple(range(p.dim()))
        return lambda t: t.permute(perm)

    def _zero_states(self, p: Tensor, amsgrad: bool, dtype: Optional[torch.dtype] = None) -> dict:
        """Zero moments (and scales) for ``p``, with its memory layout (``preserve_format``: channels_last,
        transposed...), so params, grads and states are stepped in storage order without copies.
        ``dtype``: float moments of that dtype whatever ``state_dtype`` says."""
        def like_p(dtype):
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

        if dtype is not None:
            states = {"exp_avg": like_p(dtype), "exp_avg_sq": like_p(dtype)}
        elif self.state_dtype == "int8":
            blocks = (p.numel() + INT8_BLOCK - 1) // INT8_BLOCK
            states = {"exp_avg": like_p(torch.int8), "exp_avg_sq": like_p(torch.uint8),
                      "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=p.device),
                      "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=p.device)}
        else:
            states = {"exp_avg": like_p(self._moment_dtype(p)), "exp_avg_sq": like_p(self._moment_dtype(p))}
        if amsgrad:
            states["max_exp_avg_sq"] = torch.zeros_like(states["exp_avg_sq"], memory_format=torch.preserve_format)
        return states

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if state:
            return state
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(self._zero_states(p, amsgrad))
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return state

    def _step(self) -> None:
        grad_scale = self._begin_step(self.max_grad_norm)
        if grad_scale is None:
            return
        for group in self.param_groups:
            params = self._params_with_grads(group)
            for p in params:
                self._init_state(p, group["amsgrad"])
            for bucket in self.bucket(params, lambda p: "master_param" in self.state[p]).values():
                self._update(group, bucket, grad_scale)

    def _update(self, group: dict, params: list, grad_scale: float) -> None:
        states = [self.state[p] for p in params]
        # Each param's own count, as tensors the kernels read (torch's fused AdamW takes state_steps alike):
        # params that missed steps need no bucket of their own, and torch.compile reads no step value.
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)

        def collect(key):
            return [s[key] for s in states if key in s]

        beta1, beta2 = group["betas"]
        ops.adamw_step(
            params, [p.grad for p in params], collect("exp_avg"), collect("exp_avg_sq"), collect("max_exp_avg_sq"),
            collect("master_param"), collect("exp_avg_scale"), collect("exp_avg_sq_scale"),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=steps, amsgrad=group["amsgrad"], maximize=group["maximize"], grad_scale=grad_scale, impl=self.impl)
