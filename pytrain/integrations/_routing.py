"""What ``pytrain.swap`` and the integrations share (no third-party import here, and none of pytrain.swap).

* ``record_call``: counts a call of a swapped module in its swap report (``ROUTED``: ran pytrain's kernel).
* ``kernel_decline_reason`` / ``attention_inputs``: which attention calls ``flash_attention`` computes, and
  q, k, v as autocast hands them to it.

``pytrain.swap`` re-exports these names; ``pytrain.integrations.transformers`` imports them from here, so
that the swap (which switches Hugging Face models through that integration) and the integration do not
import each other.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

ATTRIBUTE = "_pytrain_swap"  # on every module of a swapped model: (report, the module's path)
ROUTED = "pytrain"  # the outcome counted for a call that ran pytrain's kernel
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def record_call(module: nn.Module, reason: Optional[str]) -> None:
    """Count one call of a swapped ``module``: ran pytrain (reason None) or went to PyTorch (reason)."""
    tag = module.__dict__.get(ATTRIBUTE)
    if tag is not None:
        tag[0].record(tag[1], reason)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _dtype_under_autocast(t: Tensor) -> torch.dtype:
    """What autocast makes of ``t`` for a matmul-like op: its dtype, or autocast's for fp32/bf16/fp16."""
    dtype = _autocast_dtype(t.device)
    return dtype if dtype is not None and t.dtype in SUPPORTED_DTYPES else t.dtype


def attention_inputs(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """q, k, v as autocast would hand them to a matmul (unchanged when autocast is off)."""
    return tuple(t.to(_dtype_under_autocast(t)) for t in tensors)


def kernel_decline_reason(query: Tensor, key: Tensor, value: Tensor) -> Optional[str]:
    """Shape and dtype limits of ``flash_attention`` on 4-D inputs (after autocast)."""
    if key.shape != value.shape or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        return "q/k/v shapes flash attention does not take (different head dims or batch)"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return f"q heads ({query.shape[1]}) not a multiple of k/v heads ({key.shape[1]})"
    if not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    dtypes = {_dtype_under_autocast(t) for t in (query, key, value)}
    if len(dtypes) > 1 or not dtypes <= set(SUPPORTED_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))} (one of float32, bfloat16, float16)"
    return None
