"""Inputs and checks of ``orthogonalize_`` on rank-deficient, zero and non-finite matrices, shared by the CPU
tests (tests/comm/test_powersgd.py) and the GPU tests (tests/gpu/test_powersgd.py).

The contract (pytrain/ops/powersgd.py): the output's columns are orthonormal and span the input's columns, so
P P^T X = X for the input X; a zero column (or one left exactly dependent) is replaced by e_j (j: first row of
least |U[j, :]|^2) projected out, which the float64 reference reproduces; a column left as float32 rounding noise
is normalised noise (orthogonal, not comparable elementwise); a non-finite input stays non-finite.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from ..comm.powersgd import orthogonalize_
from ..ops.powersgd import EPS, orthogonalize_reference


def deficient_inputs() -> Dict[str, Tensor]:
    """name -> float32 P whose rank is below its column count (2-D or batched)."""
    gen = torch.Generator().manual_seed(11)
    low_rank = torch.randn(3, 50, 2, generator=gen, dtype=torch.float64) @ torch.randn(3, 2, 5, generator=gen,
                                                                                      dtype=torch.float64)
    tiny = torch.randn(40, 3, generator=gen)
    tiny[:, 2] = tiny[:, 0] * 1e-3 + tiny[:, 1] * 2.5  # dependent, after an independent small-scale column
    zero_dependent = torch.randn(50, 4, generator=gen)
    zero_dependent[:, 1] = 0.0
    zero_dependent[:, 3] = 2.0 * zero_dependent[:, 0]
    square = torch.randn(6, 1, generator=gen) @ torch.randn(1, 6, generator=gen)  # r = n: rank 1 of 6
    return {"rank2_of_5": low_rank.float(), "dependent_mix": tiny, "zero_and_dependent": zero_dependent,
            "square_rank1": square, "zeros": torch.zeros(2, 7, 3), "one_by_one_zero": torch.zeros(1, 1)}


def assert_orthonormal_span(out: Tensor, given: Tensor, msg: str) -> None:
    """out's columns orthonormal (to float32 rounding) and P P^T given == given (relative to given's norm)."""
    out3 = (out if out.dim() == 3 else out.unsqueeze(0)).cpu().double()
    x3 = (given if given.dim() == 3 else given.unsqueeze(0)).double()
    r = out3.shape[2]
    gram = out3.transpose(1, 2) @ out3
    worst = float((gram - torch.eye(r, dtype=torch.float64)).abs().max())
    assert worst <= 1e-5, f"{msg}: columns not orthonormal (|P^T P - I| max {worst:.2e})"
    lost = float((out3 @ (out3.transpose(1, 2) @ x3) - x3).norm()) / max(float(x3.norm()), 1e-30)
    assert lost <= 1e-5, f"{msg}: the span lost part of the input (relative {lost:.2e})"


def check_deficient(impl: str, device: str) -> None:
    """Every deficient input: orthonormal output spanning the input; equal to the float64 reference where the
    input is exactly representable (zeros, zero and dependent columns)."""
    for name, given in deficient_inputs().items():
        got = given.to(device)
        orthogonalize_(got, impl=impl)
        assert torch.isfinite(got).all(), f"{impl} {name}: non-finite output"
        assert_orthonormal_span(got, given, f"{impl} {name}")
        # columns the reference fixes: zero inputs, and columns 0-2 of zero_and_dependent (column 3 = 2 x column
        # 0 is float32 rounding noise after projection here, an exact zero in float64)
        same = {"zeros": slice(None), "one_by_one_zero": slice(None), "zero_and_dependent": slice(0, 3)}.get(name)
        if same is not None:
            expected = given.double()
            orthogonalize_reference(expected, EPS)
            torch.testing.assert_close(got.cpu().double()[..., same], expected[..., same], atol=1e-6, rtol=0,
                                       msg=f"{impl} {name}")


def check_non_finite(impl: str, device: str) -> None:
    """A NaN or an inf in a matrix never comes out as a clean finite matrix."""
    for bad in (math.nan, math.inf, -math.inf):
        given = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(12))
        given[1, 4, 1] = bad
        got = given.to(device)
        orthogonalize_(got, impl=impl)
        assert not torch.isfinite(got[1]).all(), f"{impl}: {bad} in the input came out finite"
        assert torch.isfinite(got[0]).all(), f"{impl}: a finite matrix of the batch became non-finite"
