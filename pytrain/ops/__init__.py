"""pytrain's ops: one module per op (``pytrain/ops/<op>.py``) with its schema, fake, reference,
input contract and public function.  Importing this package registers every op.

See ``pytrain.ops.registry`` for how a backend is chosen and ``pytrain.info()``
for which backends this process can use.
"""
from . import powersgd, quantize, topk  # noqa: F401 (register their ops; public API in pytrain.comm / pytrain.quant)
from .adamw import adamw_step
from .attention import flash_attention
from .global_norm import global_norm
from .lamb import lamb_step
from .lars import lars_step
from .linear_cross_entropy import linear_cross_entropy
from .linear_distillation_loss import linear_distillation_loss
from .registry import REGISTRIES, NoImplementationError, registry, set_impl

__all__ = ["flash_attention", "adamw_step", "lars_step", "lamb_step", "global_norm", "linear_cross_entropy", "linear_distillation_loss", "registry", "REGISTRIES",
           "NoImplementationError", "set_impl"]
