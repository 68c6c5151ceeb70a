"""FusedLAMB: layer-wise adaptive moments with a fused multi-tensor step.

LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", ICLR 2020) with the conventions of timm's ``Lamb``: gradients are first
scaled by ``1 / max(|G| / max_grad_norm, 1)`` (|G| the global norm over all params),
then Adam moments, update ``u = m_hat / (sqrt(v_hat) + eps) + wd * w`` and trust ratio
``|w| / |u|`` (1 when a norm is 0; clipped at 1 with ``trust_clip``; only when weight
decay is non-zero unless ``always_adapt``).  The kernel writes the moments and
accumulates the per-tensor norms in one sweep and applies the update in a second.
A non-finite global gradient norm skips the step (``last_step_skipped``).

DTensor params whose local tensor is a shard (FSDP2, tensor parallel): ``|w|`` and ``|u|`` must be the norms
of the whole param, so for those the update's norm is computed here from the local shard, both norms are
reduced over the mesh (``_sharded``), and the kernel steps each such param with ``lr * tr`` and ``adapt=False``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops
from ..ops.multi_tensor import compute_dtype, trust_ratio_or_one
from . import _sharded
from ._base import FusedOptimizer
from .hyperparameters import check_max_grad_norm


class FusedLAMB(FusedOptimizer):
    """LAMB.  Args as timm's ``Lamb``; ``impl`` forces a backend."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "bias_correction", "grad_averaging", "trust_clip",
                       "always_adapt")

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, max_grad_norm: Optional[float] = 1.0, trust_clip: bool = False,
                 bias_correction: bool = True, grad_averaging: bool = True, always_adapt: bool = False,
                 impl: Optional[str] = None):
        check_max_grad_norm(max_grad_norm)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        grad_averaging=grad_averaging, trust_clip=trust_clip, always_adapt=always_adapt)
        self.max_grad_norm = max_grad_norm
        super().__init__(params, defaults, impl)

    def _step(self) -> None:
        grad_scale = self._begin_step(self.max_grad_norm, clip_eps=0.0)
        if grad_scale is None:
            return
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            self._update(group, self._params_with_grads(group), group["step"], grad_scale)

    def _update(self, group: dict, params: list, step: int, grad_scale: float) -> None:
        beta1, beta2 = group["betas"]
        bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        adapt = group["weight_decay"] != 0 or group["always_adapt"]
        split = _sharded.split_params(self, params) if adapt else []
        whole = [p for p in params if not any(p is q for q in split)]
        kwargs = dict(beta1=beta1, beta2=beta2, beta3=1 - beta1 if group["grad_averaging"] else 1.0, eps=group["eps"],
                      weight_decay=group["weight_decay"], bias_correction1=bc1, bias_correction2=bc2,
                      grad_scale=grad_scale, trust_clip=group["trust_clip"])
        for bucket in self.bucket(whole, lambda p: None).values():
            ops.lamb_step(bucket, [p.grad for p in bucket], [self.state[p]["exp_avg"] for p in bucket],
                          [self.state[p]["exp_avg_sq"] for p in bucket], lr=group["lr"], adapt=adapt, impl=self.impl, **kwargs)
        if split:
            for p, tr in zip(split, self._trust_ratios(split, **kwargs)):
                ops.lamb_step([p], [p.grad], [self.state[p]["exp_avg"]], [self.state[p]["exp_avg_sq"]],
                              lr=group["lr"] * tr, adapt=False, impl=self.impl, **kwargs)

    def _trust_ratios(self, params: list, *, beta1: float, beta2: float, beta3: float, eps: float,
                      weight_decay: float, bias_correction1: float, bias_correction2: float, grad_scale: float,
                      trust_clip: bool) -> list:
        """``|w| / |u|`` of the whole params (``lamb_step_reference``) from their local shards, before the step."""
        squares = []
        for p in params:
            dt = compute_dtype(p)
            w, g = p.to(dt), p.grad.to(dt) * grad_scale
            m = beta1 * self.state[p]["exp_avg"].to(dt) + beta3 * g
            v = beta2 * self.state[p]["exp_avg_sq"].to(dt) + (1.0 - beta2) * g * g
            u = (m / bias_correction1) / (torch.sqrt(v) / bias_correction2 ** 0.5 + eps) + weight_decay * w
            squares.append(torch.stack([(w * w).sum(), (u * u).sum()]).double())
        norms = _sharded.active_view(self).whole_norms(params, torch.stack(squares))
        tr = trust_ratio_or_one(norms[:, 0] / norms[:, 1], norms[:, 0], norms[:, 1])
        if trust_clip:
            tr = torch.clamp(tr, max=1.0)
        return tr.tolist()
