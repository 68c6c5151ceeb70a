"""Shared machinery of pytrain's fused optimizers.

A fused optimizer is a ``torch.optim.Optimizer`` whose ``step`` gathers, per param
group, the params that have gradients into buckets of one (device, dtype, ...)
and hands each bucket to one multi-tensor op (``pytrain.ops``), which updates
every tensor of the bucket in a single pass over memory.

Global-norm gradient clipping (``max_grad_norm``) is folded into the step: the
norm over all gradients of all groups is computed once (``pytrain.ops.global_norm``)
and the kernels scale each gradient as they read it, so gradients are neither
rewritten nor read an extra time.  When that norm is not finite the step is
skipped, parameters and states stay untouched, and ``last_step_skipped`` /
``skipped_steps`` report it (like a found-inf flag).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from . import _sharded
from .hyperparameters import check_group, check_max_grad_norm

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon: coef = max_norm / (norm + 1e-6)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: validation, bucketing, global-norm clipping, dtype-preserving ``load_state_dict``."""

    #: group keys the optimizer reads, each validated by ``hyperparameters.RULES``
    hyperparameters: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, impl: Optional[str] = None):
        check_group(type(self).__name__, "defaults", defaults, self.hyperparameters)
        super().__init__(params, defaults)
        self.impl = impl
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.last_grad_norm: Optional[float] = None

    def __getstate__(self) -> dict:
        """torch's keeps only defaults, state and param_groups: a deepcopy or pickle would lose the settings
        (impl, max_grad_norm, state_dtype...) and the skip counters, and step with other ones."""
        return {**super().__getstate__(), **{k: v for k, v in self.__dict__.items() if not k.startswith("_")}}

    # ------------------------------------------------------------------------------------ validation
    def _check_hyperparameters(self, group: dict, where: str) -> None:
        """One rule per key (``hyperparameters.py``); optimizers add rules that tie keys together."""
        check_group(type(self).__name__, where, group, self.hyperparameters)

    def _check_group(self, group: dict, where: str) -> None:
        """Hyper-parameters, then the params: one device, real floats."""
        name = type(self).__name__
        self._check_hyperparameters(group, where)
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"{name}: a param group mixes devices {sorted(map(str, devices))}; "
                             "put the params of each device in their own group")
        for p in group["params"]:
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"{name}: param of dtype {p.dtype} is not supported "
                                 "(real floating-point params only)")

    def add_param_group(self, param_group: dict) -> None:
        """torch's, then the new group is validated (and taken out again if it is invalid)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_groups(self) -> None:
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {i}")

    def _params_with_grads(self, group: dict) -> List[Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   "(use torch.optim.SparseAdam for sparse embeddings)")
            out.append(p)
        return out

    # ------------------------------------------------------------------------------------ clipping
    def _grad_scale(self, max_grad_norm: float, clip_eps: float) -> Optional[float]:
        """Clip factor for all grads of all groups (1.0 if within the norm); None if the norm is not finite.

        scale = min(1, max_norm / (norm + clip_eps)); clip_eps = 1e-6 follows
        torch.nn.utils.clip_grad_norm_, clip_eps = 0 timm's Lamb.
        """
        norm = self.grad_norm()
        self.last_grad_norm = norm
        if not math.isfinite(norm):
            return None
        if norm + clip_eps == 0:
            return 1.0
        return min(1.0, max_grad_norm / (norm + clip_eps))

    def grad_norm(self) -> float:
        """L2 norm over the gradients of every param of every group (one fused pass per device/dtype);
        DTensor params: over the whole params, the same on every rank (``_sharded``)."""
        if _sharded.uses_dtensors(self):
            return _sharded.grad_norm(self, lambda grads: ops.global_norm(grads, impl=self.impl))
        buckets: Dict[Tuple, List[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in self._params_with_grads(group):
                buckets[(p.grad.device, p.grad.dtype)].append(p.grad)
        # hypot: the norms of float64 buckets may be far beyond 1e154, where squaring them overflows
        return math.hypot(*(float(ops.global_norm(grads, impl=self.impl)) for grads in buckets.values()))

    def _begin_step(self, max_grad_norm: Optional[float], clip_eps: float = CLIP_EPS) -> Optional[float]:
        """Returns the gradient scale for this step, or None (and records a skipped step) if it must be skipped."""
        check_max_grad_norm(max_grad_norm)  # it may have been set since construction (DDPTrainer does)
        scale = self._grad_scale(max_grad_norm, clip_eps) if max_grad_norm is not None else 1.0
        self.last_step_skipped = scale is None
        if scale is None:
            self.skipped_steps += 1
        return scale

    # ------------------------------------------------------------------------------------ stepping
    @staticmethod
    def bucket(params: Iterable[Tensor], key: Callable[[Tensor], Hashable]) -> Dict[Hashable, List[Tensor]]:
        """Params grouped by ``(device, dtype, key(p))`` so each group goes to one multi-tensor op call."""
        out: Dict[Hashable, List[Tensor]] = defaultdict(list)
        for p in params:
            out[(p.device, p.dtype, key(p))].append(p)
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()  # a scheduler or the caller may have written a group since the last step
        with _sharded.LocalView(self):  # DTensor params: their local shards (a no-op without DTensors)
            self._step()  # defined by each optimizer
        return loss

    # ------------------------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """torch's; states of DTensor params are DTensors (``torch.distributed.checkpoint`` reshards them)."""
        return _sharded.portable_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but each state tensor gets the dtype the optimizer's setting gives it
        (``state_dtype``: fp32 masters, int8 codes, fp32 moments of bf16 params...; see ``_state_dtype``)
        instead of the param's, and the param's memory layout (channels_last...).  The saved groups'
        hyper-parameters are validated before anything is replaced."""
        for i, group in enumerate(state_dict["param_groups"]):
            self._check_hyperparameters(group, f"saved param group {i}")
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                self.state[p] = {k: self._restore(k, v, p) for k, v in saved_state[pid].items()}
        with _sharded.LocalView(self):  # conversions run on local shards
            for p in [p for g in self.param_groups for p in g["params"] if p in self.state]:
                self.state[p] = self._convert_state(p, self.state[p])

    def _state_dtype(self, key: str, param: Tensor) -> Optional[torch.dtype]:
        """The dtype of floating state ``key`` of ``param`` (None: keep the saved one); default: the param's."""
        return param.dtype

    def _convert_state(self, param: Tensor, state: dict) -> dict:
        """Hook: a loaded state converted to the optimizer's format (AdamW: int8 codes <-> float moments)."""
        return state

    def _restore(self, key: str, value, param: Tensor):
        if not torch.is_tensor(value):
            return value
        if key == "step":
            return value.detach().to(dtype=torch.float32, device="cpu").clone()
        dtype = (self._state_dtype(key, param) if value.is_floating_point() else None) or value.dtype
        if value.shape == param.shape:  # a state like the param also gets its layout (no copy at each step)
            return torch.empty_like(param, dtype=dtype).copy_(value.detach())
        return value.detach().to(device=param.device, dtype=dtype).clone()
