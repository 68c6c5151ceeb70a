"""Attention modules on top of ``pytrain.ops.flash_attention``.

* ``FlashAttention``: a module taking (q, k, v) shaped (batch, heads, seqlen, headdim).
* ``MultiheadAttention``: a drop-in subclass of ``torch.nn.MultiheadAttention`` (same
  constructor, parameters, state_dict and forward signature).  Calls the kernel supports
  (``need_weights=False``; no mask, or the square causal mask with or without ``is_causal``; head dim 16..256;
  no bias_kv / zero_attn) run flash attention; every other call is passed to PyTorch's
  implementation unchanged, with a one-time warning for ``need_weights=True`` since the
  weights are exactly what flash attention avoids computing.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import Window, flash_attention, head_dim_unsupported
from ..ops.registry import FLOAT_DTYPES


class FlashAttention(nn.Module):
    """``flash_attention`` as a module; dropout is applied only in training mode.

    forward(q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, D)) -> (B, H, Lq, D).
    """

    def __init__(self, causal: bool = False, scale: Optional[float] = None, window: Window = None,
                 dropout: float = 0.0):
        super().__init__()
        self.causal, self.scale, self.window, self.dropout = causal, scale, window, dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attention(q, k, v, causal=self.causal, scale=self.scale, window=self.window,
                               dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, window={self.window}, dropout={self.dropout}"


def _is_causal_mask(mask: Tensor, lq: int, lk: int) -> bool:
    """True if ``mask`` (bool: True = masked, or additive float) is exactly the square causal mask."""
    if mask.dim() != 2 or mask.shape != (lq, lk) or lq != lk:
        return False
    upper = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).triu(1)
    masked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    allowed_zero = mask.dtype == torch.bool or bool((mask[~upper] == 0).all())
    return allowed_zero and torch.equal(masked, upper)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` that runs flash attention where it can.

    ``decline_reason(...)`` says why a call would go to PyTorch's implementation.
    """

    _warned_need_weights = False

    def _seq_len(self, x: Tensor) -> int:
        return x.shape[1 if self.batch_first and x.dim() == 3 else 0]

    def _shape_decline(self, query: Tensor, key: Tensor, value: Tensor) -> Optional[str]:
        """Why (query, key, value) are not inputs flash attention computes: shapes torch refuses (PyTorch's
        implementation then raises its own error, of its own type) or an empty batch / sequence (its empty result)."""
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return f"query / key / value of {query.dim()} / {key.dim()} / {value.dim()} dims (torch expects " \
                   f"3-D, or 2-D unbatched, for all three)"
        if (query.shape[-1], key.shape[-1], value.shape[-1]) != (self.embed_dim, self.kdim, self.vdim):
            return f"feature sizes {query.shape[-1]} / {key.shape[-1]} / {value.shape[-1]}, the module's " \
                   f"{self.embed_dim} / {self.kdim} / {self.vdim}"
        if key.shape[:-1] != value.shape[:-1]:
            return f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in length or batch"
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            return f"query batch {query.shape[batch_dim]}, key batch {key.shape[batch_dim]}"
        if query.numel() == 0 or key.numel() == 0:
            return "empty batch or sequence"
        return None

    def decline_reason(self, query: Tensor, key_padding_mask: Optional[Tensor], need_weights: bool,
                       attn_mask: Optional[Tensor], is_causal: bool, key: Optional[Tensor] = None,
                       value: Optional[Tensor] = None) -> Optional[str]:
        """Why this call goes to PyTorch's implementation (None: flash attention runs it).  key, value: the
        call's (the key's sequence length decides which masks fit; default: the query, self-attention)."""
        key = query if key is None else key
        value = key if value is None else value
        shape_reason = self._shape_decline(query, key, value)
        if shape_reason:
            return shape_reason
        head_dim = self.embed_dim // self.num_heads
        lq = self._seq_len(query)
        lk = self._seq_len(key)
        if need_weights:
            return "need_weights=True (flash attention never forms the weights)"
        if key_padding_mask is not None:
            return "key_padding_mask is not supported"
        # Masks as torch reads them: is_causal is a hint that needs attn_mask (torch raises without one) and
        # then stands for torch's causal mask, aligned top-left, which is flash attention's (bottom-right)
        # only when L == S; without the hint, attn_mask must be (L, S) (torch raises otherwise).
        if is_causal and attn_mask is None:
            return "is_causal without attn_mask (torch raises: the hint needs the mask)"
        if is_causal and lq != lk:
            return f"is_causal with L={lq} != S={lk} (torch's causal mask is aligned top-left, flash attention's " \
                   f"bottom-right)"
        if attn_mask is not None and not is_causal:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (lq, lk):
                return f"attn_mask of shape {tuple(attn_mask.shape)} for L={lq}, S={lk} (torch expects (L, S) " \
                       f"and raises)"
            if not _is_causal_mask(attn_mask, lq, lk):
                return "arbitrary attn_mask (only no mask or the causal mask)"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if head_dim_unsupported(head_dim):
            return head_dim_unsupported(head_dim)
        if query.dtype not in FLOAT_DTYPES:
            return f"dtype {query.dtype} (pytrain's kernels serve float32, bfloat16, float16)"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        reason = self.decline_reason(query, key_padding_mask, need_weights, attn_mask, is_causal, key, value)
        if reason is not None:
            if need_weights and not MultiheadAttention._warned_need_weights:
                MultiheadAttention._warned_need_weights = True
                warnings.warn("pytrain.nn.MultiheadAttention: need_weights=True falls back to PyTorch's attention; "
                              "pass need_weights=False to use flash attention", stacklevel=2)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        causal = is_causal or attn_mask is not None
        return self._flash_forward(query, key, value, causal), None

    def _projections(self) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tuple[Optional[Tensor], ...]]:
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return weights, biases

    def _flash_forward(self, query: Tensor, key: Tensor, value: Tensor, causal: bool) -> Tensor:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if not self.batch_first or unbatched:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        weights, biases = self._projections()
        heads = []
        for x, w, b in zip((query, key, value), weights, biases):
            batch, length, _ = x.shape
            heads.append(F.linear(x, w, b).view(batch, length, self.num_heads, -1).transpose(1, 2))
        out = flash_attention(*heads, causal=causal, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.embed_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return out.squeeze(1) if unbatched else out
