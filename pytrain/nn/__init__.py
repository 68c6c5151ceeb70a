"""Modules built on pytrain's kernels."""
from .attention import FlashAttention, MultiheadAttention
from .linear_cross_entropy import LinearCrossEntropyLoss
from .linear_distillation_loss import LinearDistillationLoss

__all__ = ["FlashAttention", "MultiheadAttention", "LinearCrossEntropyLoss", "LinearDistillationLoss"]
