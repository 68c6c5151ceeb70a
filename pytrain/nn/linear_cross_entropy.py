"""``LinearCrossEntropyLoss``: a language-model head's linear layer and cross-entropy in one module, computed by
``pytrain.ops.linear_cross_entropy`` without the (tokens, vocabulary) logits."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.linear_cross_entropy import check_options, linear_cross_entropy


class LinearCrossEntropyLoss(nn.Module):
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` with the options of
    ``pytrain.ops.linear_cross_entropy`` fixed at construction.

    forward(hidden (..., H), weight (V, H), target (...), bias (V,) or None, num_items_in_batch=None):
    leading dims are flattened; returns a 0-dim float32 loss, or per-token losses shaped like ``target``
    for ``reduction="none"``.  Memory O(chunk x V + N x H), never O(N x V).
    """

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean", chunk_size: Optional[int] = None):
        super().__init__()
        check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.softcap, self.reduction, self.chunk_size = softcap, reduction, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        if not isinstance(hidden, Tensor) or not isinstance(target, Tensor):
            raise TypeError(f"LinearCrossEntropyLoss: hidden and target must be Tensors, got "
                            f"{type(hidden).__name__} and {type(target).__name__}")
        if hidden.shape[:-1] != target.shape:
            raise ValueError(f"LinearCrossEntropyLoss: hidden (..., H) = {tuple(hidden.shape)} and target (...) = "
                             f"{tuple(target.shape)} differ in their leading dims")
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias,
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction,
                                    num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size)
        return loss.reshape(target.shape) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}")
