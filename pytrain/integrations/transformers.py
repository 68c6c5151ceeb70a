"""pytrain attention for Hugging Face transformers (optional dependency).

Importing this module registers ``"pytrain"`` in transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the mask builder, SDPA's), so

    import pytrain.integrations.transformers  # noqa: F401
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pytrain")

works like ``attn_implementation="sdpa"``, and ``pytrain.swap(hf_model)`` switches a built model.

Contract (transformers' ``sdpa_attention_forward``): ``fn(module, query, key, value, attention_mask,
dropout=0.0, scaling=None, is_causal=None, sliding_window=None, **kwargs) -> (out, None)`` with
q (batch, heads, seqlen_q, headdim), k/v (batch, kv_heads, seqlen_k, headdim) and out
(batch, seqlen_q, heads, headdim).  The mask builder (SDPA's, ``pytrain_mask``) returns None for a
plain causal pattern without padding, and for a sliding-window one over a whole sequence (no cache:
seqlen_q == seqlen_k) too, as the window comes from the layer's ``sliding_window``; otherwise a boolean
(batch, 1, seqlen_q, seqlen_k) mask, True = attend.  So a training step needs no mask, and
``torch.compile`` no data-dependent check.  A mask that is exactly the causal / sliding-window pattern
runs flash attention (one check per mask tensor, shared by all layers; under ``torch.compile``, where
that check would read data, masks go to SDPA); any other mask (padding, packed sequences, custom mask
functions), ``output_attentions``, softcapping, position biases and paged caches go to transformers'
SDPA path (given the window's pattern when the builder skipped it), and the call is counted with its
reason in the swap report.  Sliding window: key j is seen by query i when i - sliding_window < j <= i
(transformers' ``sliding_window_overlay``), i.e. flash window (sliding_window - 1, 0).
"""
from __future__ import annotations

import types
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
    """True if a boolean mask (batch|1, 1|heads, lq, lk) is the plain causal / sliding / full pattern.
    Under ``torch.compile`` False (SDPA applies the mask, exactly): the comparison reads the mask's data."""
    global _mask_verdict
    if torch.compiler.is_compiling():
        return False
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
        if attention_mask is None and _window(causal, sliding_window) and key.shape[2] > sliding_window:
            # pytrain_mask skipped the window's mask, which SDPA needs (it has no window argument)
            attention_mask = _pattern(query.shape[2], key.shape[2], True, sliding_window, query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    q, k, v = attention_inputs(query, key, value)
    out = flash_attention(q, k, v, causal=causal, scale=scaling, window=_window(causal, sliding_window),
                          dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def pytrain_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, *,
                 local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
                 allow_is_bidirectional_skip: bool = False, **kwargs) -> Optional[Tensor]:
    """transformers' ``sdpa_mask``, but a causal sliding-window mask over a whole sequence (q_length == kv_length,
    no offsets) is skipped (None) wherever a plain causal one would be (no padding, no custom mask function):
    ``pytrain_attention_forward`` applies the window from the layer's ``sliding_window``.  ``local_size`` only
    enters ``sdpa_mask``'s skip decisions; a built mask keeps the window (its ``mask_function`` has it)."""
    whole = q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
    if local_size is not None and allow_is_causal_skip and not allow_is_bidirectional_skip and whole:
        local_size = None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def register() -> None:
    """Register ``"pytrain"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, pytrain_attention_forward)
    AttentionMaskInterface.register(NAME, pytrain_mask)


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


# ------------------------------------------------------------------------------------------ fused loss
FUSED_LOSS = "loss from labels by pytrain.ops.linear_cross_entropy (no logits in training)"


def fused_loss_decline_reason(model: PreTrainedModel) -> Optional[str]:
    """Why ``pytrain.swap`` keeps a model's own loss (None: training losses can go through the fused op)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return "lm_head is not a plain nn.Linear (not a causal LM head, or one with its own forward)"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if type(model).__name__.endswith("ForCausalLM") or type(model).__name__ == "GPT2LMHeadModel":
        return None
    return f"{type(model).__name__} is not a known causal LM class (*ForCausalLM, GPT2LMHeadModel)"


def _call_decline_reason(model: nn.Module, kwargs: dict) -> Optional[str]:
    if not (model.training and torch.is_grad_enabled()):
        return "evaluation (logits kept for metrics)"
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if kwargs.get(name) not in (None, 0):
            return f"{name} is set"
    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    return None


def use_fused_loss(model: PreTrainedModel, record: Callable[[Optional[str]], None]) -> Callable[[], None]:
    """Training calls with ``labels`` compute ``loss`` by the fused op from the last hidden states, and return
    ``logits=None`` (they are never built); any other call (no labels, eval, ``logits_to_keep``) runs the model's
    own forward, and ``record`` counts each call with labels (None: fused, else the reason).  Returns the undo.

    The new forward is a method bound to ``model`` and finds the model's forward, head and ``record`` on the
    instance, so a copy of the swapped model (``copy.deepcopy``: EMA weights, a compiled twin) computes with
    its own parameters."""
    model._pytrain_forward = model.forward
    model._pytrain_record = record
    model.forward = types.MethodType(_fused_loss_forward, model)
    model.lm_head.__class__ = _CapturingHead

    def undo():
        for name in ("forward", "_pytrain_forward", "_pytrain_record"):
            delattr(model, name)
        model.lm_head.__class__ = nn.Linear
    return undo


class _CapturingHead(nn.Linear):
    """The swapped model's ``lm_head`` (same parameters, same state dict): while ``captured`` is a list, it
    appends its input (the last hidden states) there and returns an empty placeholder instead of the logits."""

    captured: Optional[list] = None

    def forward(self, hidden: Tensor) -> Tensor:
        if self.captured is None:
            return super().forward(hidden)
        self.captured.append(hidden)
        return hidden.new_zeros(0)


def _fused_loss_forward(model: PreTrainedModel, *args, **kwargs):
    from ..nn.linear_cross_entropy import LinearCrossEntropyLoss

    original, head = model._pytrain_forward, model.lm_head
    if kwargs.get("labels") is None:  # inference: not a loss call, nothing to count
        return original(*args, **kwargs)
    reason = _call_decline_reason(model, kwargs)
    model._pytrain_record(reason)
    if reason is not None:
        return original(*args, **kwargs)
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    head.captured = []
    try:
        out = original(*args, **kwargs)
        hidden = head.captured[0]
    finally:
        head.captured = None
    if shift_labels is None:  # transformers' ForCausalLMLoss: token i predicts labels[i + 1]
        shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    cap = getattr(model.config, "final_logit_softcapping", None)
    out.loss = LinearCrossEntropyLoss(softcap=cap)(hidden, head.weight, shift_labels.to(hidden.device),
                                                   head.bias, num_items_in_batch=num_items)
    out.logits = None
    return out
