"""``LinearDistillationLoss``: a student's language-model head distilled from a teacher's in one module, computed by
``pytrain.ops.linear_distillation_loss`` without either (tokens, vocabulary) logit matrix."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.linear_distillation_loss import check_options, linear_distillation_loss


class LinearDistillationLoss(nn.Module):
    """``pytrain.ops.linear_distillation_loss`` with its options fixed at construction.

    forward(student_hidden (..., Hs), student_weight (V, Hs), teacher_hidden (..., Ht), teacher_weight (V, Ht),
    target (...) or None): leading dims are flattened; returns a 0-dim float32 loss, or per-token losses shaped like
    the leading dims for ``reduction="none"``.  The teacher gets no gradient.  Memory O(chunk x V + N x H), never
    O(N x V).
    """

    def __init__(self, *, temperature: float = 1.0, kind: str = "kl", beta: float = 0.5,
                 hard_label_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: Optional[int] = None):
        super().__init__()
        # target presence is known at forward: check the rest now, hard_label_weight's need of a target then
        check_options(kind, temperature, beta, hard_label_weight, ignore_index, reduction, has_target=True)
        self.temperature, self.kind, self.beta = temperature, kind, beta
        self.hard_label_weight, self.ignore_index = hard_label_weight, ignore_index
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None) -> Tensor:
        for name, x in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
            if not isinstance(x, Tensor):
                raise TypeError(f"LinearDistillationLoss: {name} must be a Tensor, got {type(x).__name__}")
        lead = student_hidden.shape[:-1]
        if teacher_hidden.shape[:-1] != lead or (isinstance(target, Tensor) and target.shape != lead):
            raise ValueError(f"LinearDistillationLoss: student_hidden (..., Hs) = {tuple(student_hidden.shape)}, "
                             f"teacher_hidden (..., Ht) = {tuple(teacher_hidden.shape)} and target (...) = "
                             f"{None if target is None else tuple(getattr(target, 'shape', ()))} differ in their "
                             f"leading dims")
        loss = linear_distillation_loss(
            student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
            target.reshape(-1) if isinstance(target, Tensor) else target, temperature=self.temperature,
            kind=self.kind, beta=self.beta, hard_label_weight=self.hard_label_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size)
        return loss.reshape(lead) if self.reduction == "none" else loss

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, temperature={self.temperature}, beta={self.beta}, "
                f"hard_label_weight={self.hard_label_weight}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")
