"""Checks of flash attention shared by the CPU tests (tests/ops/test_attention.py) and the GPU tests
(tests/gpu/test_attention.py).

``check_any_finite_scores``: attention with scores far beyond exp's range (scale = 3e9, or inputs of 1e15)
against the float64 reference.  The softmax is then one-hot to float64 precision, so out, lse and dv have
float32 accuracy.  dq and dk do not: dS = P (dP - delta) cancels dO . v_top - dO . out = 0, and two float32
dot products of length D differ by up to D u ||dO|| ||v|| (u = 2^-24), which dq = scale dS k multiplies by
|scale| |k| (SDPA's float32 backward has the same term, when it is not NaN).  The bound below is that
derivation, with a factor 2 of margin:

    |dq_i error| <= 4 D u |scale| max ||dO_i|| max ||v_j|| max |k|
    |dk_j error| <= 4 D u |scale| max ||dO_i|| max ||v_j|| max |q| sum_i P[i, j]
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.attention import _window_sides, allowed_mask, flash_attention
from .tolerances import ATTENTION_ATOL

U32 = 2.0**-24


def _run(fn, qkv, grad):
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    out, lse = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), lse] + [t.grad for t in leaves]


def check_any_finite_scores(impl: str, q: Tensor, k: Tensor, v: Tensor, grad: Tensor, **kwargs) -> None:
    """float32 q (B, H, Lq, D), k, v (B, Hkv, Lk, D), grad like q; kwargs of ``flash_attention`` (scale, causal,
    window): out, lse, dq, dk, dv of backend ``impl`` against the float64 reference, within the bounds above."""
    call = lambda impl_: lambda q_, k_, v_: flash_attention(q_, k_, v_, impl=impl_, return_lse=True, **kwargs)  # noqa: E731
    out, lse, dq, dk, dv = _run(call(impl), (q, k, v), grad)
    e_out, e_lse, e_dq, e_dk, e_dv = _run(call("reference"), [t.double() for t in (q, k, v)], grad.double())
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
    atol = ATTENTION_ATOL[torch.float32]
    torch.testing.assert_close(out.double(), e_out, atol=atol, rtol=atol, msg="out")
    torch.testing.assert_close(dv.double(), e_dv, atol=atol, rtol=atol, msg="dv")
    torch.testing.assert_close(lse.double(), e_lse, atol=atol, rtol=4 * q.shape[-1] * U32, msg="lse")
    signed_scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    term = 4 * q.shape[-1] * U32 * abs(signed_scale) * float(grad.double().norm(dim=-1).max() *
                                                             v.double().norm(dim=-1).max())
    allowed = allowed_mask(q.shape[2], k.shape[2], kwargs.get("causal", False), *_window_sides(kwargs.get("window")))
    s = signed_scale * (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2))
    p = torch.exp(s.masked_fill(~allowed, -torch.inf) - e_lse.masked_fill(e_lse == -torch.inf, torch.inf)[..., None])
    colsum = float(p.sum(dim=-2).max())
    dq_bound = term * float(k.abs().max()) + atol
    dk_bound = term * float(q.abs().max()) * max(colsum, 1.0) * group + atol
    dq_err, dk_err = float((dq.double() - e_dq).abs().max()), float((dk.double() - e_dk).abs().max())
    assert dq_err <= dq_bound, f"dq error {dq_err:.3g} over the bound {dq_bound:.3g}"
    assert dk_err <= dk_bound, f"dk error {dk_err:.3g} over the bound {dk_bound:.3g}"
