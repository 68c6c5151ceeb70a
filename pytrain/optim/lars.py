"""FusedLARS: layer-wise adaptive rate scaling with a fused multi-tensor step.

LARS (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017)
with the conventions of timm's ``Lars`` (trust ratio ``tc*|w| / (|g| + wd*|w| + eps)``,
1 when a norm is 0; adaptation only when weight decay is non-zero unless
``always_adapt``; ``trust_clip`` = LARC, min(ratio / lr, 1)); SGD momentum with
dampening and Nesterov as in torch.optim.SGD.  Per-tensor norms are computed by
the kernel in a first sweep over the params and grads, the update in a second.

DTensor params whose local tensor is a shard (FSDP2, tensor parallel): the trust ratio needs the norms of
the whole param, so for those the norms are reduced over the mesh (``_sharded``), the adapted update
``(g + wd * w) * tr`` is formed here and the kernel steps it with ``adapt=False`` (momentum and update fused).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops.multi_tensor import compute_dtype, trust_ratio_or_one
from . import _sharded
from ._base import FusedOptimizer


class FusedLARS(FusedOptimizer):
    """LARS / LARC.  Args as timm's ``Lars`` (``trust_coefficient`` = timm's ``trust_coeff``; ``lr`` defaults
    to 1.0 as there, and a param group may set its own); ``impl`` forces a backend."""

    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coefficient", "eps",
                       "trust_clip", "always_adapt")

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8, nesterov: bool = False, *,
                 dampening: float = 0.0, trust_clip: bool = False, always_adapt: bool = False,
                 impl: Optional[str] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        super().__init__(params, defaults, impl)

    def _check_hyperparameters(self, group: dict, where: str) -> None:
        super()._check_hyperparameters(group, where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"FusedLARS: Nesterov momentum requires a momentum and zero dampening ({where})")

    def _step(self) -> None:
        for group in self.param_groups:
            params = self._params_with_grads(group)
            with_momentum = group["momentum"] != 0
            adapt = group["weight_decay"] != 0 or group["always_adapt"]
            fresh = {p for p in params if with_momentum and "momentum_buffer" not in self.state[p]}
            for p in fresh:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for (_, _, init), bucket in self.bucket(params, lambda p: p in fresh).items():
                split = _sharded.split_params(self, bucket) if adapt else []
                whole = [p for p in bucket if not any(p is q for q in split)]
                grads = self._adapted_grads(group, split) if split else []
                for ps, gs, adapt_in_kernel in ((whole, [p.grad for p in whole], adapt), (split, grads, False)):
                    if not ps:
                        continue
                    ops.lars_step(
                        ps, gs, [self.state[p]["momentum_buffer"] for p in ps] if with_momentum else [],
                        lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                        weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
                        eps=group["eps"], nesterov=group["nesterov"], trust_clip=group["trust_clip"],
                        adapt=adapt_in_kernel, init_buffers=init, impl=self.impl)

    def _adapted_grads(self, group: dict, params: list) -> list:
        """``(g + wd * w) * tr`` per local shard, tr from the norms of the whole params (``lars_step_reference``)."""
        dt = compute_dtype(params[0])
        w = [p.to(dt) for p in params]
        g = [p.grad.to(dt) for p in params]
        squares = torch.stack([torch.stack([(x * x).sum() for x in (wi, gi)]) for wi, gi in zip(w, g)])
        norms = _sharded.active_view(self).whole_norms(params, squares)
        w_norm, g_norm = norms[:, 0], norms[:, 1]
        wd, lr = group["weight_decay"], group["lr"]
        tr = trust_ratio_or_one(group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                w_norm, g_norm)
        if group["trust_clip"]:
            tr = torch.clamp(tr / torch.tensor(lr, dtype=dt), max=1.0)
        return [((gi + wd * wi) * tr[i]).to(p.dtype) for i, (p, wi, gi) in enumerate(zip(params, w, g))]
