"""Plain-PyTorch reference for flash attention (forward and backward), the contract of every backend.

Shapes: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H % Hkv == 0 (GQA/MQA: query head
h reads kv head h // (H // Hkv)); out (B, H, Lq, D) in q's dtype; lse (B, H, Lq) float32
(float64 for float64 inputs).

    S[i, j]  = scale * q[i] . k[j]            (scale defaults to 1 / sqrt(D))
    allowed  = j - i - (Lk - Lq) in [-left, right]
             causal: right = 0;  window=None: left = right = unbounded
    lse[i]   = log sum_{allowed j} exp(S[i, j])            (-inf when row i allows no key)
    P[i, j]  = exp(S[i, j] - lse[i])  if allowed else 0
    out[i]   = sum_j  P[i, j] * keep[i, j] / (1 - p) * v[j]   (rows with no key: 0)

Causal masks are aligned bottom-right, as in FlashAttention >= 2.1: the last query sees
every key, and with Lq > Lk the first Lq - Lk queries see none.  Lq = 5, Lk = 3:

    keys ->  0 1 2
    q0       . . .
    q1       . . .
    q2       x . .
    q3       x x .
    q4       x x x

Dropout keeps P[i, j] when ``dropout_keep(seed, b*H + h, i, j, p)`` holds: a
stateless hash of the element's coordinates (three rounds of the "lowbias32" integer
hash of C. Wellons), identical in every backend, so the backward pass regenerates
the forward's mask from the seed alone and tests compare backends exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

UNBOUNDED = -1  # window side with no limit
MASK32 = 0xFFFFFFFF


def lowbias32(x: Tensor) -> Tensor:
    """The lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """Keep an element when its hash >= this uint32 threshold (probability 1 - p)."""
    return min(int(p * 2**32), MASK32)


def dropout_keep(seed: int, bh: Tensor, i: Tensor, j: Tensor, p: float) -> Tensor:
    """Boolean keep mask for coordinates (bh = b * H + h, query i, key j), broadcast together.

    x = h(j ^ s0); x = h(x ^ i); x = h(x ^ bh ^ s1), with s0, s1 the low and high 32 bits of seed.
    """
    s0, s1 = seed & MASK32, (seed >> 32) & MASK32
    x = lowbias32(j ^ s0)
    x = lowbias32(x ^ i)
    x = lowbias32(x ^ bh ^ s1)
    return x >= dropout_threshold(p)


def allowed_mask(lq: int, lk: int, causal: bool, window_left: int, window_right: int, device=None) -> Tensor:
    """(Lq, Lk) boolean mask of the keys each query may attend to (see module docstring)."""
    offset = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None] - (lk - lq)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    right = 0 if causal else window_right
    if right != UNBOUNDED:
        ok &= offset <= right
    if window_left != UNBOUNDED:
        ok &= offset >= -window_left
    return ok


def _dropout_mask(b: int, h: int, lq: int, lk: int, p: float, seed: int, device) -> Tensor:
    bh = torch.arange(b * h, device=device).view(b, h, 1, 1)
    i = torch.arange(lq, device=device).view(1, 1, lq, 1)
    j = torch.arange(lk, device=device).view(1, 1, 1, lk)
    return dropout_keep(seed, bh, i, j, p)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
                      window_right: int, dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Materialised attention: returns (out, lse).  Differentiable (autograd gives the reference backward)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = h // hkv
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    s = scale * (q.to(acc) @ kf.transpose(-1, -2))
    ok = allowed_mask(lq, lk, causal, window_left, window_right, q.device)
    s = s.masked_fill(~ok, -math.inf)
    has_key = ok.any(dim=-1)  # rows that allow no key get lse = -inf, P = 0, no NaN in any gradient
    lse_finite = torch.logsumexp(s.masked_fill(~has_key[:, None], 0.0), dim=-1)
    p = torch.exp(s - lse_finite.unsqueeze(-1))
    lse = lse_finite.masked_fill(~has_key, -math.inf)
    if dropout_p > 0:
        p = p * _dropout_mask(b, h, lq, lk, dropout_p, seed, q.device) / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype), lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool, window_left: int, window_right: int, dropout_p: float,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the reference forward by autograd, in the inputs' dtypes."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, _ = attention_forward(*leaves, scale, causal, window_left, window_right, dropout_p, seed)
        grads = torch.autograd.grad(o, leaves, grad_out.to(o.dtype), allow_unused=True)
    return tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves))


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
