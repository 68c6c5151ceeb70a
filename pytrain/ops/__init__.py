"""pytrain's ops: public functions that check their inputs and dispatch to a backend.

See ``pytrain.ops.registry`` for how a backend is chosen and ``pytrain.info()``
for which backends this process can use.
"""
from .attention import flash_attention
from . import compress_ops  # noqa: F401 (registers the gradient-compression ops)
from .optim_ops import adamw_step, global_norm, lamb_step, lars_step
from . import quant_ops  # noqa: F401 (registers the quantize / dequantize ops)
from .registry import REGISTRIES, NoImplementationError, registry

__all__ = ["flash_attention", "adamw_step", "lars_step", "lamb_step", "global_norm", "registry", "REGISTRIES", "NoImplementationError"]
