"""Modules built on pytrain's kernels."""
from .attention import FlashAttention, MultiheadAttention

__all__ = ["FlashAttention", "MultiheadAttention"]
