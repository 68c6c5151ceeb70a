"""8-bit quantization (int8, fp8 e4m3 / e5m2) with one scale per group: schemas, fakes, the reference,
the input contract and the public functions.

Ops (namespace ``pytrain``):

* ``quantize(x, fmt, group_size, stochastic, seed) -> (data, scales)``: x contiguous float32 / bfloat16 /
  float16 of n elements; data shaped like x (int8, float8_e4m3fn or float8_e5m2 codes); scales
  (ceil(n / group_size),) float32, one per group of ``group_size`` consecutive elements.
* ``dequantize(data, scales, group_size, dtype) -> out``: out shaped like data, in ``dtype``.

Backends: ``csrc/cpu/quantize.cpp``, ``csrc/cuda/quantize.cu``, ``kernels/quantize.py``, bit-exact against
the reference below.  ``pytrain.quant`` builds per-tensor, per-block and per-axis quantization on these.

The kernels see a contiguous tensor of n elements cut into groups of ``group_size`` consecutive
elements (the last group partial); ``pytrain.quant`` maps per-tensor, per-block and per-axis scaling
onto groups.  Per group, in float32 (float64 for float64 input, reference only):

    amax  = max |x|                               over the group
    group is non-finite (any NaN / inf)  ->  scale = NaN, codes 0   (dequantizes to NaN: never finite)
    amax < qmax * 2^-126  (zero or tiny)  ->  scale = 0,   codes 0   (dequantizes to exact +0)
    otherwise scale = amax / qmax,  inv = qmax / amax   (each one IEEE-rounded division)
              y = x * inv                                (one IEEE-rounded product, never fused)
              int8:  code = clamp(round_half_even(y), -127, 127)
              fp8:   code = fp8(clamp(y, -qmax, qmax))   (round to nearest even: saturating cast)
    dequantize: x_hat = decode(code) * scale   (fp32 product, then rounded to the output dtype)

qmax: int8 127, fp8_e4m3 448 (torch.float8_e4m3fn), fp8_e5m2 57344 (torch.float8_e5m2).  The tiny
threshold keeps the scale a normal float32 and inv finite; such groups (|x| < 5.7e-36 for e4m3) are
flushed to zero.  Both scale and inv are stored/used as float32, so every backend computes the same y
and the same codes bit for bit.

Stochastic rounding (int8 only): with r = round_half_even(y) and d = y - r in [-1/2, 1/2] (exact),

    code = clamp(r + sign(d) * (u24 < |d| * 2^24), -127, 127),   u24 = hash(i, seed) >> 8,

so E[code] = r + d = y up to 2^-24 (and |code - y| < 1).  hash(i, seed) = lowbias32(lowbias32(lo(i) ^ s0) ^ hi(i) ^ s1), with i the
element's flat index, s0 / s1 the low / high 32 bits of the seed (the lowbias32 hash of the attention
dropout, see hash.py): counter-based, so every backend draws the same codes for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .hash import MASK32, lowbias32
from .library import define_op
from .registry import FLOAT_DTYPES, registry

QUANTIZE_SCHEMA = "(Tensor x, str fmt, int group_size, bool stochastic, int seed) -> (Tensor, Tensor)"
DEQUANTIZE_SCHEMA = "(Tensor data, Tensor scales, int group_size, ScalarType dtype) -> Tensor"
SEED_LIMIT = 2**63  # seeds are int64 in the schema; the hash uses their low and high 32 bits


# ------------------------------------------------------------------------------------------ reference
@dataclass(frozen=True)
class Format:
    """One 8-bit format: its name, storage dtype and largest magnitude."""

    name: str
    dtype: torch.dtype
    qmax: float

    @property
    def tiny(self) -> float:
        """Groups with amax below this are zero groups (scale stays a normal float32)."""
        return self.qmax * 2.0**-126


FORMATS: Dict[str, Format] = {
    "int8": Format("int8", torch.int8, 127.0),
    "fp8_e4m3": Format("fp8_e4m3", torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": Format("fp8_e5m2", torch.float8_e5m2, 57344.0),
}
FORMAT_OF_DTYPE = {f.dtype: f for f in FORMATS.values()}


def num_groups(numel: int, group_size: int) -> int:
    return (numel + group_size - 1) // group_size


def stochastic_bits(numel: int, seed: int, device=None) -> Tensor:
    """(numel,) int64 tensor of the 24-bit uniform integers u24 of elements 0..numel-1."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    s0, s1 = seed & MASK32, (seed >> 32) & MASK32
    return lowbias32(lowbias32((i & MASK32) ^ s0) ^ (i >> 32) ^ s1) >> 8


def _grouped(x: Tensor, group_size: int, dtype: torch.dtype) -> Tuple[Tensor, int]:
    """x flattened into (groups, width), zero-padded, as ``dtype``; and the pad length.  width is group_size,
    or n when one group holds all n elements: memory follows the tensor, never the group size (the pad is
    under min(group_size, n))."""
    flat = x.reshape(-1).to(dtype)
    width = max(1, min(group_size, flat.numel()))
    pad = num_groups(flat.numel(), width) * width - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, width), pad


def quantize_reference(x: Tensor, fmt: str, group_size: int, stochastic: bool, seed: int) -> Tuple[Tensor, Tensor]:
    """(codes shaped like x in the format's dtype, (groups,) float32 scales); see the module docstring."""
    spec = FORMATS[fmt]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg, pad = _grouped(x, group_size, ct)
    amax = xg.abs().amax(dim=1, keepdim=True)
    finite = torch.isfinite(xg).all(dim=1, keepdim=True)
    live = finite & (amax >= spec.tiny)
    safe = torch.where(live, amax, torch.ones_like(amax))
    qmax = torch.full_like(safe, spec.qmax)  # tensor / tensor: `float / tensor` is reciprocal * float in torch
    scale = torch.where(live, safe / qmax, torch.where(finite, 0.0, float("nan")))
    y = xg * torch.where(live, qmax / safe, torch.zeros_like(safe))
    y = torch.where(live, y, torch.zeros_like(y))  # non-finite groups: inf * 0 would be NaN
    if stochastic:
        u24 = stochastic_bits(xg.numel(), seed, x.device).view_as(xg).to(ct)
        nearest = torch.round(y)
        d = y - nearest
        bump = torch.sign(d) * (u24 < d.abs() * 2.0**24).to(ct)
        codes = (nearest + bump).clamp(-spec.qmax, spec.qmax).to(spec.dtype)
    elif spec.dtype == torch.int8:
        codes = torch.round(y).clamp(-spec.qmax, spec.qmax).to(torch.int8)
    else:
        codes = y.clamp(-spec.qmax, spec.qmax).to(torch.float32).to(spec.dtype)
    codes = codes.reshape(-1)[: x.numel()].view(x.shape)
    return codes, scale.reshape(-1).to(torch.float32)


def dequantize_reference(data: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """decode(data) * scale of each element's group, computed in float32 (float64 for float64 output)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    values, _ = _grouped(data, group_size, ct)
    out = values * scales.to(ct)[:, None]
    return out.reshape(-1)[: data.numel()].view(data.shape).to(dtype)


# ------------------------------------------------------------------------------------------ contract
Problems = List[Tuple[type, str]]  # (exception type of the raising path, reason)


def _group_size_problems(group_size) -> Problems:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        return [(ValueError, f"group_size must be an int >= 1, got {group_size!r}")]
    return []


def _quantize_problems(x: Tensor, fmt: str, group_size: int, stochastic: bool, seed: int) -> Problems:
    out = [] if fmt in FORMATS else [(ValueError, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")]
    out += _group_size_problems(group_size)
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        out.append((TypeError, f"dtype {x.dtype} not supported (float32, bfloat16, float16)"))
    if not x.is_contiguous() or x.layout != torch.strided:
        out.append((ValueError, f"x must be a dense contiguous tensor (shape {tuple(x.shape)}, strides {x.stride()})"))
    if stochastic and fmt != "int8":
        out.append((ValueError, f"stochastic rounding is defined for int8 only, not {fmt}"))
    if not 0 <= seed < SEED_LIMIT:
        out.append((ValueError, f"seed must be in [0, 2^63), got {seed}"))
    return out


def _dequantize_problems(data: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Problems:
    out: Problems = []
    if data.dtype not in FORMAT_OF_DTYPE:
        out.append((TypeError, f"data has dtype {data.dtype}; expected int8, float8_e4m3fn or float8_e5m2"))
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        out.append((TypeError, f"output dtype {dtype} not supported (float32, bfloat16, float16)"))
    out += _group_size_problems(group_size)
    if out:
        return out
    groups = num_groups(data.numel(), group_size)
    if scales.dtype != torch.float32 or scales.shape != (groups,) or scales.device != data.device:
        out.append((ValueError, f"scales must be ({groups},) float32 on {data.device}, got "
                                f"{tuple(scales.shape)} {scales.dtype} on {scales.device}"))
    if not (data.is_contiguous() and scales.is_contiguous()):
        out.append((ValueError, "data and scales must be contiguous"))
    return out


def unsupported(x: Tensor, fmt: str, group_size: int, *, stochastic: bool = False, seed: int = 0) -> List[str]:
    """Why ``quantize_groups(x, fmt, group_size, ...)`` cannot run (empty when it can); the raising path
    and callers that choose another route (``pytrain.quant``) share these rules."""
    return [message for _, message in _quantize_problems(x, fmt, group_size, stochastic, seed)]


def _raise_first(op: str, problems: Problems) -> None:
    if problems:
        kind, message = problems[0]
        raise kind(f"{op}: {message}")


# ------------------------------------------------------------------------------------------ ops
def _quantize_fake(x, fmt, group_size, stochastic, seed):
    torch._check(fmt in FORMATS, lambda: f"quantize: unknown format {fmt!r}")
    torch._check(group_size >= 1, lambda: f"quantize: group_size must be >= 1, got {group_size}")
    scales = x.new_empty((num_groups(x.numel(), group_size),), dtype=torch.float32)
    return torch.empty_like(x, dtype=FORMATS[fmt].dtype), scales


def _dequantize_fake(data, scales, group_size, dtype):
    torch._check(group_size >= 1, lambda: f"dequantize: group_size must be >= 1, got {group_size}")
    torch._check(scales.shape == (num_groups(data.numel(), group_size),),
                 lambda: f"dequantize: {tuple(scales.shape)} scales for {data.numel()} codes in groups of {group_size}")
    return torch.empty_like(data, dtype=dtype)


def _triton_quantize(x, fmt, group_size, stochastic, seed):
    from ..kernels.quantize import quantize
    return quantize(x, FORMATS[fmt], group_size, stochastic, seed)


def _triton_dequantize(data, scales, group_size, dtype):
    from ..kernels.quantize import dequantize
    return dequantize(data, FORMAT_OF_DTYPE[data.dtype], scales, group_size, dtype)


define_op("quantize", QUANTIZE_SCHEMA, reference=quantize_reference, fake=_quantize_fake, triton=_triton_quantize)
define_op("dequantize", DEQUANTIZE_SCHEMA, reference=dequantize_reference, fake=_dequantize_fake,
          triton=_triton_dequantize)


def quantize_groups(x: Tensor, fmt: str, group_size: int, *, stochastic: bool = False, seed: int = 0,
                    impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Quantize contiguous ``x`` (n elements) with one scale per ``group_size`` consecutive elements.

    Returns (data shaped like x in the format's dtype, (ceil(n / group_size),) float32 scales).
    """
    _raise_first("quantize", _quantize_problems(x, fmt, group_size, stochastic, seed))
    if x.numel() == 0:
        return _quantize_fake(x, fmt, group_size, stochastic, seed)
    return registry("quantize").select(x.device, x.dtype, impl).fn(x, fmt, group_size, stochastic, seed)


def dequantize_groups(data: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype = torch.float32, *,
                      impl: Optional[str] = None) -> Tensor:
    """``decode(data) * scale`` per element (scale of its group of ``group_size``), shaped like data, in ``dtype``."""
    _raise_first("dequantize", _dequantize_problems(data, scales, group_size, dtype))
    if data.numel() == 0:
        return _dequantize_fake(data, scales, group_size, dtype)
    return registry("dequantize").select(data.device, dtype, impl).fn(data, scales, group_size, dtype)
