"""Drop-in fused optimizers: one multi-tensor kernel call per group of same-device, same-dtype params."""
from .adamw import FusedAdamW
from .convert import from_torch
from .lamb import FusedLAMB
from .lars import FusedLARS

__all__ = ["FusedAdamW", "FusedLARS", "FusedLAMB", "from_torch"]
