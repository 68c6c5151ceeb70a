"""pytrain attention for Hugging Face transformers (optional dependency).

Importing this module registers ``"pytrain"`` in transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the mask builder, SDPA's), so

    import pytrain.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pytrain")

works like ``attn_implementation="sdpa"``, and ``pytrain.swap(hf_model)`` switches a built model.

Contract (transformers' ``sdpa_attention_forward``): ``fn(module, query, key, value, attention_mask,
dropout=0.0, scaling=None, is_causal=None, sliding_window=None, **kwargs) -> (out, None)`` with
q (batch, heads, seqlen_q, headdim), k/v (batch, kv_heads, seqlen_k, headdim) and out
(batch, seqlen_q, heads, headdim).  The mask builder returns None for a plain causal (or, within
the window, sliding-window) pattern without padding; otherwise a boolean (batch, 1, seqlen_q,
seqlen_k) mask, True = attend.  A mask that is exactly the causal / sliding-window pattern runs
flash attention (one check per mask tensor, shared by all layers); any other mask (padding,
packed sequences, custom mask functions), ``output_attentions``, softcapping, position biases and
paged caches go to transformers' SDPA path, and the call is counted with its reason in the swap
report.  Sliding window: key j is seen by query i when i - sliding_window < j <= i
(transformers' ``sliding_window_overlay``), i.e. flash window (sliding_window - 1, 0).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops.attention import flash_attention
from ._routing import attention_inputs, kernel_decline_reason, record_call

NAME = "pytrain"
_UNSUPPORTED_KWARGS = ("output_attentions", "softcap", "position_bias", "cache", "s_aux", "sinks")
_mask_verdict: Tuple[Optional[weakref.ref], tuple, bool] = (None, (), False)  # last checked mask -> verdict


def _window(causal: bool, sliding_window: Optional[int]) -> Optional[Tuple[int, int]]:
    return (sliding_window - 1, 0) if causal and sliding_window else None


def _pattern(lq: int, lk: int, causal: bool, sliding_window: Optional[int], device) -> Tensor:
    """Boolean (lq, lk) pattern, True = attend, bottom-right aligned like flash attention."""
    offset = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None] - (lk - lq)
    allowed = offset <= 0 if causal else torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal and sliding_window:
        allowed &= offset > -sliding_window
    return allowed


def _mask_is_pattern(mask: Tensor, causal: bool, sliding_window: Optional[int]) -> bool:
    """True if a boolean mask (batch|1, 1|heads, lq, lk) is the plain causal / sliding / full pattern."""
    global _mask_verdict
    key = (causal, sliding_window, tuple(mask.shape))
    ref, last_key, verdict = _mask_verdict
    if ref is not None and ref() is mask and last_key == key:
        return verdict
    verdict = mask.dtype == torch.bool and mask.dim() == 4 and \
        torch.equal(mask, _pattern(*mask.shape[-2:], causal, sliding_window, mask.device).expand_as(mask))
    _mask_verdict = (weakref.ref(mask), key, verdict)
    return verdict


def decline_reason(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                   causal: bool, sliding_window: Optional[int], kwargs: dict) -> Optional[str]:
    """Why this call goes to transformers' SDPA path (None: flash attention computes it)."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) not in (None, False):
            return f"{name} is not supported"
    if sliding_window and not causal:
        return "sliding window without causal masking"
    if attention_mask is not None and not _mask_is_pattern(attention_mask, causal, sliding_window):
        return "attention mask with padding or a custom pattern (not plain causal / sliding window)"
    return kernel_decline_reason(query, key, value)


def pytrain_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                              **kwargs) -> Tuple[Tensor, None]:
    """transformers attention function: flash attention, or SDPA with the reason counted."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1  # one query (decoding) sees every cached key
    reason = decline_reason(module, query, key, value, attention_mask, causal, sliding_window, kwargs)
    record_call(module, reason)
    if reason is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    q, k, v = attention_inputs(query, key, value)
    out = flash_attention(q, k, v, causal=causal, scale=scaling, window=_window(causal, sliding_window),
                          dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"pytrain"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, pytrain_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def decline_reason_for_model(model: PreTrainedModel) -> Optional[str]:
    """Why ``pytrain.swap`` keeps a model's attention (None: it can switch to ``"pytrain"``)."""
    if not model._can_set_attn_implementation():
        return "model does not dispatch attention through transformers' AttentionInterface"
    return None


def use_pytrain(model: PreTrainedModel) -> Callable[[], None]:
    """Switch ``model`` (and its submodels) to ``attn_implementation="pytrain"``; returns the undo."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)

    def undo():
        model.set_attn_implementation(previous)
    return undo


register()
