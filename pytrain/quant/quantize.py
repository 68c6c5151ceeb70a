"""8-bit quantization of tensors: ``quantize`` -> ``QTensor`` -> ``dequantize``.

Formats (scale = absmax / qmax of each scaling group, codes saturate at +-qmax):

    fmt         codes                  qmax     rounding
    int8        int8 in [-127, 127]    127      nearest even, or stochastic (unbiased)
    fp8_e4m3    torch.float8_e4m3fn    448      nearest even
    fp8_e5m2    torch.float8_e5m2      57344    nearest even

Granularity (one float32 scale per group):

    block_size=None, axis=None   per tensor: 1 scale
    block_size=B                 per block of B consecutive elements of the flattened tensor
                                 (row-major), the last block partial: ceil(numel / B) scales
    axis=k                       per index along dim k: shape[k] scales; scale i covers x.select(k, i),
                                 e.g. axis=0 of a 2-D tensor is one scale per row, axis=1 per column

Special values: a group holding NaN or +-inf gets scale NaN (codes 0), so it dequantizes to NaN:
a non-finite input never comes back finite.  A group of zeros, or with absmax below qmax * 2^-126
(subnormal territory, e.g. < 5.7e-36 for e4m3), gets scale 0 and codes 0 and dequantizes to exact
+0.  Exact definitions: pytrain/ops/quantize.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.registry import FLOAT_DTYPES
from ..ops.quantize import FORMATS, SEED_LIMIT, dequantize_groups, num_groups, quantize_groups

DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: computed by the reference backend


def _check_granularity(shape: Tuple[int, ...], block_size: Optional[int], axis: Optional[int]) -> Optional[int]:
    """Validates block_size / axis for ``shape``; returns axis made non-negative."""
    if block_size is not None and axis is not None:
        raise ValueError("quantize: give block_size or axis, not both")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"quantize: block_size must be an int >= 1, got {block_size!r}")
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
        raise ValueError(f"quantize: axis {axis!r} out of range for a {len(shape)}-D tensor of shape {tuple(shape)}")
    return axis % len(shape)


def _num_scales(shape: torch.Size, block_size: Optional[int], axis: Optional[int]) -> int:
    if axis is not None:
        return shape[axis]
    if block_size is not None:
        return num_groups(shape.numel(), block_size)
    return 1


def _moves_axis(shape: torch.Size, axis: Optional[int]) -> bool:
    """Per-axis groups are contiguous only when every dim before ``axis`` has size 1."""
    return axis is not None and math.prod(shape[:axis]) != 1


@dataclass
class QTensor:
    """A quantized tensor.

    data: codes with the original ``shape`` (int8 / float8_e4m3fn / float8_e5m2 for ``fmt``); a uint8
        tensor (e.g. received over a wire) is taken as the codes' bytes and viewed as the format's dtype.
    scales: (number of groups,) float32: 1 per tensor, ceil(numel / block_size) per block, shape[axis] per axis.
    fmt: "int8", "fp8_e4m3" or "fp8_e5m2".  block_size / axis: the granularity (at most one set).
    shape, dtype: the original tensor's shape and dtype (default: data's shape, float32).
    """

    data: Tensor
    scales: Tensor
    fmt: str
    block_size: Optional[int] = None
    axis: Optional[int] = None
    shape: Optional[torch.Size] = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"QTensor: unknown format {self.fmt!r}; expected one of {', '.join(FORMATS)}")
        code_dtype = FORMATS[self.fmt].dtype
        self.shape = torch.Size(self.data.shape if self.shape is None else self.shape)
        if self.data.dtype == torch.uint8:
            self.data = self.data.view(code_dtype)
        if self.data.dtype != code_dtype:
            raise TypeError(f"QTensor: {self.fmt} data must be {code_dtype} (or its uint8 bytes), got {self.data.dtype}")
        if self.data.numel() != self.shape.numel():
            raise ValueError(f"QTensor: data has {self.data.numel()} elements, shape {tuple(self.shape)} needs "
                             f"{self.shape.numel()}")
        self.data = self.data.reshape(self.shape)
        self.axis = _check_granularity(self.shape, self.block_size, self.axis)
        if self.dtype not in DTYPES:
            raise TypeError(f"QTensor: dtype {self.dtype} not supported (float32, bfloat16, float16, float64)")
        count = _num_scales(self.shape, self.block_size, self.axis)
        if self.scales.dtype != torch.float32 or self.scales.shape != (count,):
            raise ValueError(f"QTensor: scales must be ({count},) float32 for this granularity, got "
                             f"{tuple(self.scales.shape)} {self.scales.dtype}")
        if self.scales.device != self.data.device:
            raise ValueError(f"QTensor: scales on {self.scales.device}, data on {self.data.device}")

    @property
    def nbytes(self) -> int:
        """Bytes of the codes plus the scales (what a QTensor costs to store or send)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: Optional[torch.dtype] = torch.float32, *, impl: Optional[str] = None) -> Tensor:
        return dequantize(self, dtype, impl=impl)


def quantize(x: Tensor, fmt: str, *, block_size: Optional[int] = None, axis: Optional[int] = None,
             stochastic: bool = False, seed: Optional[int] = None, impl: Optional[str] = None) -> QTensor:
    """Quantize ``x`` (any shape; float32, bfloat16 or float16) to 8 bits.

    Args:
        fmt: "int8", "fp8_e4m3" or "fp8_e5m2" (see the module docstring).
        block_size: one scale per block of this many consecutive elements (e.g. 128, 256).
        axis: one scale per index along this dim (negative counts from the end).
        stochastic: int8 only: round up with probability equal to the fraction (unbiased); the draw is
            a hash of (element index, seed), the same on every backend.
        seed: for stochastic rounding, in [0, 2^63); default drawn from torch's global generator.
        impl: force a backend ("cpu", "cuda", "triton", "reference").
    Non-contiguous inputs are copied to contiguous memory first.  Per-axis scaling with dims of
    size > 1 before ``axis`` moves ``axis`` to the front (a copy); the stochastic draws then follow
    that moved order.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize: expected a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"quantize: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    axis = _check_granularity(x.shape, block_size, axis)
    if fmt not in FORMATS:
        raise ValueError(f"quantize: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, ())) if stochastic else 0
    count = _num_scales(x.shape, block_size, axis)
    moved = x.movedim(axis, 0) if _moves_axis(x.shape, axis) else x
    group = block_size if block_size is not None else max(1, x.numel() // max(count, 1))
    data, scales = quantize_groups(moved.contiguous(), fmt, group, stochastic=stochastic, seed=seed, impl=impl)
    if x.numel() == 0:
        scales = torch.zeros(count, dtype=torch.float32, device=x.device)
    if moved is not x:
        data = data.movedim(0, axis).contiguous()
    return QTensor(data, scales, fmt, block_size, axis, x.shape, x.dtype)


def dequantize(qt: QTensor, dtype: Optional[torch.dtype] = torch.float32, *, impl: Optional[str] = None) -> Tensor:
    """The tensor a QTensor stands for: decode(code) * scale per element, shape ``qt.shape``, in ``dtype``
    (float32 by default; None: the original dtype)."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize: expected a QTensor, got {type(qt).__name__}")
    dtype = qt.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise TypeError(f"dequantize: output dtype {dtype} not supported (float32, bfloat16, float16, float64)")
    if qt.data.numel() == 0:
        return torch.empty(qt.shape, dtype=dtype, device=qt.data.device)
    moves = _moves_axis(qt.shape, qt.axis)
    data = qt.data.movedim(qt.axis, 0).contiguous() if moves else qt.data.contiguous()
    group = qt.block_size if qt.block_size is not None else qt.data.numel() // qt.scales.numel()
    out = dequantize_groups(data, qt.scales.contiguous(), group, dtype, impl=impl)
    return out.movedim(0, qt.axis).contiguous() if moves else out
