"""pytrain: fast, exact training kernels for PyTorch on GPU and CPU.

    import pytrain
    opt = pytrain.optim.FusedAdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0)
    print(pytrain.info())      # versions, CPU/GPU features, which backend serves each op and why
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _extension

_extension.load_extension()  # registers the C++ kernels if the extension is built

from . import comm, cost, nn, ops, optim, quant  # noqa: E402,F401
from .info import info  # noqa: E402,F401
from .swap import patch_sdpa, swap, unswap  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["comm", "cost", "nn", "ops", "optim", "quant", "info", "swap", "unswap", "patch_sdpa", "__version__"]
