"""8-bit quantization ops: schemas, input checks and dispatch.

Ops (namespace ``pytrain``; the maths, special values and stochastic rounding are specified in
``pytrain/testing/quant_ref.py``):

* ``quantize(x, fmt, group_size, stochastic, seed) -> (data, scales)``: x contiguous float32 / bfloat16 /
  float16 of n elements; data shaped like x (int8, float8_e4m3fn or float8_e5m2 codes); scales
  (ceil(n / group_size),) float32, one per group of ``group_size`` consecutive elements.
* ``dequantize(data, scales, group_size, dtype) -> out``: out shaped like data, in ``dtype``.

``pytrain.quant`` builds per-tensor, per-block and per-axis quantization on these.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..testing import quant_ref
from .library import define_op
from .registry import FLOAT_DTYPES, registry

QUANTIZE_SCHEMA = "(Tensor x, str fmt, int group_size, bool stochastic, int seed) -> (Tensor, Tensor)"
DEQUANTIZE_SCHEMA = "(Tensor data, Tensor scales, int group_size, ScalarType dtype) -> Tensor"
SEED_LIMIT = 2**63  # seeds are int64 in the schema; the hash uses their low and high 32 bits


def _quantize_fake(x, fmt, group_size, stochastic, seed):
    scales = x.new_empty((quant_ref.num_groups(x.numel(), group_size),), dtype=torch.float32)
    return torch.empty_like(x, dtype=quant_ref.FORMATS[fmt].dtype), scales


def _dequantize_fake(data, scales, group_size, dtype):
    return torch.empty_like(data, dtype=dtype)


define_op("quantize", QUANTIZE_SCHEMA, reference=quant_ref.quantize, fake=_quantize_fake,
          triton="pytrain.kernels.quantize:quantize")
define_op("dequantize", DEQUANTIZE_SCHEMA, reference=quant_ref.dequantize, fake=_dequantize_fake,
          triton="pytrain.kernels.quantize:dequantize")


def _check_group_size(op: str, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be an int >= 1, got {group_size!r}")


def quantize_groups(x: Tensor, fmt: str, group_size: int, *, stochastic: bool = False, seed: int = 0,
                    impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Quantize contiguous ``x`` (n elements) with one scale per ``group_size`` consecutive elements.

    Returns (data shaped like x in the format's dtype, (ceil(n / group_size),) float32 scales).
    """
    if fmt not in quant_ref.FORMATS:
        raise ValueError(f"quantize: unknown format {fmt!r}; expected one of {', '.join(quant_ref.FORMATS)}")
    _check_group_size("quantize", group_size)
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"quantize: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if not x.is_contiguous() or x.layout != torch.strided:
        raise ValueError(f"quantize: x must be a dense contiguous tensor (shape {tuple(x.shape)}, "
                         f"strides {x.stride()})")
    if stochastic and fmt != "int8":
        raise ValueError(f"quantize: stochastic rounding is defined for int8 only, not {fmt}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"quantize: seed must be in [0, 2^63), got {seed}")
    if x.numel() == 0:
        return _quantize_fake(x, fmt, group_size, stochastic, seed)
    return registry("quantize").select(x.device, x.dtype, impl).fn(x, fmt, group_size, stochastic, seed)


def dequantize_groups(data: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype = torch.float32, *,
                      impl: Optional[str] = None) -> Tensor:
    """``decode(data) * scale`` per element (scale of its group of ``group_size``), shaped like data, in ``dtype``."""
    if data.dtype not in quant_ref.FORMAT_OF_DTYPE:
        raise TypeError(f"dequantize: data has dtype {data.dtype}; expected int8, float8_e4m3fn or float8_e5m2")
    _check_group_size("dequantize", group_size)
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dequantize: output dtype {dtype} not supported (float32, bfloat16, float16)")
    groups = quant_ref.num_groups(data.numel(), group_size)
    if scales.dtype != torch.float32 or scales.shape != (groups,) or scales.device != data.device:
        raise ValueError(f"dequantize: scales must be ({groups},) float32 on {data.device}, got "
                         f"{tuple(scales.shape)} {scales.dtype} on {scales.device}")
    if not (data.is_contiguous() and scales.is_contiguous()):
        raise ValueError("dequantize: data and scales must be contiguous")
    if data.numel() == 0:
        return _dequantize_fake(data, scales, group_size, dtype)
    return registry("dequantize").select(data.device, dtype, impl).fn(data, scales, group_size, dtype)
