"""pytrain: fast, exact training kernels for PyTorch on GPU and CPU."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _extension

_extension.load_extension()  # registers the C++ kernels if the extension is built

from . import ops  # noqa: E402

__version__ = "0.1.0"
from . import optim  # noqa: E402,F401
