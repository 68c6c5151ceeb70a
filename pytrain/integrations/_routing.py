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

from ..ops import attention as attention_op
from ..ops.registry import FLOAT_DTYPES

ATTRIBUTE = "_pytrain_swap"  # on every module of a swapped model: (report, the module's path)
ROUTED = "pytrain"  # the outcome counted for a call that ran pytrain's kernel


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
    return dtype if dtype is not None and t.dtype in FLOAT_DTYPES else t.dtype


def attention_inputs(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """q, k, v as autocast would hand them to a matmul (unchanged when autocast is off)."""
    return tuple(t.to(_dtype_under_autocast(t)) for t in tensors)


def kernel_decline_reason(query: Tensor, key: Tensor, value: Tensor) -> Optional[str]:
    """Why ``flash_attention`` cannot take these 4-D inputs as autocast hands them over (None: it can).

    The rules are the op's own (``pytrain.ops.attention.unsupported``); float64, which only the op's
    reference computes, stays with PyTorch."""
    dtypes = {_dtype_under_autocast(t) for t in (query, key, value)}
    if torch.float64 in dtypes:
        return "float64 (pytrain's kernels serve float32, bfloat16, float16)"
    reasons = attention_op.unsupported(query, key, value, dtype=dtypes.pop() if len(dtypes) == 1 else None)
    return reasons[0] if reasons else None
