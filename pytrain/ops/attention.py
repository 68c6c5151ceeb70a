"""Flash attention: ops, input checks, autograd and the public ``flash_attention`` function.

Ops (namespace ``pytrain``; maths, masks and the dropout hash in
``pytrain/testing/attention_ref.py``):

* ``attention_fwd(q, k, v, scale, causal, window_left, window_right, dropout_p, seed) -> (out, lse)``
* ``attention_bwd(grad_out, q, k, v, out, lse, scale, causal, window_left, window_right, dropout_p, seed)
  -> (dq, dk, dv)``

The forward saves only ``out`` and the log-sum-exp ``lse``; the backward recomputes
the probabilities tile by tile (FlashAttention-2, Dao 2023).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..testing import attention_ref
from .library import define_op
from .registry import registry

FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window_left, int window_right, "
              "float dropout_p, int seed) -> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal, "
              "int window_left, int window_right, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, scale, causal, window_left, window_right, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _bwd_fake(grad_out, q, k, v, out, lse, scale, causal, window_left, window_right, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


define_op("attention_fwd", FWD_SCHEMA, reference=attention_ref.attention_forward, fake=_fwd_fake,
          triton="pytrain.kernels.attention:attention_forward")
define_op("attention_bwd", BWD_SCHEMA, reference=attention_ref.attention_backward, fake=_bwd_fake,
          triton="pytrain.kernels.attention:attention_backward")

Window = Optional[Tuple[Optional[int], Optional[int]]]


def _window_sides(window: Window) -> Tuple[int, int]:
    """(left, right) with -1 for an unbounded side; None means full attention."""
    if window is None:
        return attention_ref.UNBOUNDED, attention_ref.UNBOUNDED
    if len(window) != 2:
        raise ValueError(f"flash_attention: window must be (left, right), got {window!r}")
    sides = []
    for side in window:
        if side is None or side == attention_ref.UNBOUNDED:
            sides.append(attention_ref.UNBOUNDED)
        elif isinstance(side, int) and side >= 0:
            sides.append(side)
        else:
            raise ValueError(f"flash_attention: window sides must be ints >= 0 (or None / -1 for unbounded), "
                             f"got {window!r}")
    return sides[0], sides[1]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (batch, heads, seqlen, headdim), got shape "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"flash_attention: dtype {q.dtype} not supported (float32, bfloat16, float16)")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    (b, h, _, d), (bk, hk, _, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"flash_attention: batch sizes differ: q has {b}, k/v have {bk}")
    if d != dk:
        raise ValueError(f"flash_attention: head dims differ: q has {d}, k/v have {dk}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"flash_attention: q heads ({h}) must be a multiple of k/v heads ({hk}) (GQA/MQA)")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {d} out of range [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window_left, window_right, dropout_p, seed, impl):
        args = (scale, causal, window_left, window_right, dropout_p, seed)
        fwd = registry("attention_fwd").select(q.device, q.dtype, impl)
        out, lse = fwd.fn(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args, ctx.impl = args, impl
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        bwd = registry("attention_bwd").select(q.device, q.dtype, ctx.impl)
        dq, dk, dv = bwd.fn(grad_out.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    window: Window = None, dropout_p: float = 0.0, return_lse: bool = False,
                    seed: Optional[int] = None, impl: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention without materialising the (seqlen_q, seqlen_k) score matrix.

    Args:
        q: (batch, heads, seqlen_q, headdim); headdim in [16, 256].
        k, v: (batch, kv_heads, seqlen_k, headdim); heads % kv_heads == 0 (GQA / MQA).
        causal: mask keys after the query, aligned bottom-right when seqlen_q != seqlen_k
            (see ``pytrain.testing.attention_ref`` for the picture).
        scale: score scale, default 1 / sqrt(headdim).
        window: (left, right) sliding window: query i sees keys j with
            -left <= j - i - (seqlen_k - seqlen_q) <= right; None or -1 for an unbounded side.
        dropout_p: probability of dropping an attention weight (training); reproducible from ``seed``
            (default: drawn from torch's global generator).
        return_lse: also return the log-sum-exp (batch, heads, seqlen_q), float32.
        impl: force a backend ("cpu", "triton", "reference", ...).
    Returns:
        out (batch, heads, seqlen_q, headdim) in q's dtype, or (out, lse).  Rows that may see no key give 0.
    """
    _check_inputs(q, k, v)
    window_left, window_right = _window_sides(window)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    scale = attention_ref.default_scale(q.shape[-1], scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be finite, got {scale}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    if q.numel() == 0 or k.shape[2] == 0:
        out = q * 0.0  # nothing to attend: zeros that still carry (zero) gradients
        lse = torch.full(q.shape[:3], -math.inf, dtype=_lse_dtype(q), device=q.device)
    else:
        out, lse = _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, causal, window_left,
                                         window_right, float(dropout_p), seed, impl)
    return (out, lse) if return_lse else out
