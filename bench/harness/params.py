"""The optimizer suites' param set: GPT_SHAPES (pytrain.testing.optim_compare), leading dims scaled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from torch import Tensor

from pytrain.testing.optim_compare import GPT_SHAPES


@dataclass
class ParamSet:
    """The benchmarks' fp32 params and gradients; ``fresh()`` gives each case its own copies."""

    params: List[Tensor]
    grads: List[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def fresh(self) -> List[Tensor]:
        out = []
        for p, g in zip(self.params, self.grads):
            q = p.clone().requires_grad_()
            q.grad = g.clone()
            out.append(q)
        return out


def scaled_shapes(scale: float) -> List[Tuple[int, ...]]:
    """GPT_SHAPES with every leading dim times ``scale``: same 50 tensors, ``scale`` times the params."""
    return [(max(1, round(s[0] * scale)),) + tuple(s[1:]) for s in GPT_SHAPES]
