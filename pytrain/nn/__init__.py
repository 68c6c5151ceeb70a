"""Modules built on pytrain's kernels."""
from .attention import FlashAttention, MultiheadAttention
from .linear_cross_entropy import LinearCrossEntropyLoss

__all__ = ["FlashAttention", "MultiheadAttention", "LinearCrossEntropyLoss"]
