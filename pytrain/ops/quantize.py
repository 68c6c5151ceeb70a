"""8-bit quantization (int8, fp8 e4m3 / e5m2) with one scale per group: schemas, fakes, the reference,
the input contract and the public functions.

Ops (namespace ``pytrain``):

* ``quantize(x, fmt, group_size, stochastic, seed) -> (data, scales)``: x contiguous float32 / bfloat16 /
  float16 of n elements; data shaped like x (int8, float8_e4m3fn or float8_e5m2 codes); scales
  (ceil(n / group_size),) float32, one per group of ``group_size`` consecutive elements.
* ``dequantize(data, scales, group_size, dtype) -> out``: out shaped like data, in ``dtype``.

Codec ops of the quantized all-reduce hook (pytrain/comm/hooks/_quant.py), each one pass over memory
where the composition of the two ops above takes several; they write into given tensors (views of the
hook's send / receive buffers, or the gradient bucket), and their results are those compositions bit for
bit (float32 throughout, every product and sum IEEE-rounded, none fused):

* ``quantize_into(x, residual, data, scales, fmt, group_size)``: x (n,) contiguous float32 / bfloat16 /
  float16; data (n,) codes of ``fmt``, scales (ceil(n / group_size),) float32, both contiguous, written.
  Without residual: ``data, scales = quantize(x)``.  With residual r ((n,) float32, contiguous),
  error feedback:  y = float32(x) + r;  data, scales = quantize(y);  r := y - dequantize(data, scales).
* ``requantize_mean(data, scales, out_data, out_scales, residual, group_size)``: W rows of codes
  data (W, C) and their scales (W, G), G = ceil(C / group_size), each row grouped on its own (rows may
  have any stride, their elements are contiguous, e.g. rows of a packed receive buffer):
      a = (dequantize(row 0) + ... + dequantize(row W-1)) / W      summed in row order, one division
      out_data (C,), out_scales (G,) = quantize(a)                   in data's format
      residual (m <= C elements, float32), if given:  r := r + W * (a - dequantize(out))   on a[:m]
  (the second quantization's error, times W: the mean's owner carries it for all W ranks).
* ``dequantize_into(data, scales, group_size, out)``: out (contiguous, data.numel() elements, float32 /
  bfloat16 / float16) := dequantize(data, scales) in out's dtype.

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
QUANTIZE_INTO_SCHEMA = ("(Tensor x, Tensor(a!)? residual, Tensor(b!) data, Tensor(c!) scales, str fmt, "
                        "int group_size) -> ()")
REQUANTIZE_MEAN_SCHEMA = ("(Tensor data, Tensor scales, Tensor(a!) out_data, Tensor(b!) out_scales, "
                          "Tensor(c!)? residual, int group_size) -> ()")
DEQUANTIZE_INTO_SCHEMA = "(Tensor data, Tensor scales, int group_size, Tensor(a!) out) -> ()"
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


def quantize_into_reference(x: Tensor, residual: Optional[Tensor], data: Tensor, scales: Tensor, fmt: str,
                            group_size: int) -> None:
    """quantize(x) into data / scales; with a residual r: quantize(x + r), r := (x + r) - dequantize."""
    y = x if residual is None else x.to(torch.float32) + residual
    codes, s = quantize_reference(y, fmt, group_size, False, 0)
    if residual is not None:
        residual.copy_(y - dequantize_reference(codes, s, group_size, torch.float32))
    data.copy_(codes)
    scales.copy_(s)


def requantize_mean_reference(data: Tensor, scales: Tensor, out_data: Tensor, out_scales: Tensor,
                              residual: Optional[Tensor], group_size: int) -> None:
    """quantize(mean of the rows' dequantized values) into out_data / out_scales; residual += W * error."""
    rows = data.shape[0]
    a = dequantize_reference(data[0].contiguous(), scales[0].contiguous(), group_size, torch.float32)
    for w in range(1, rows):
        a = a + dequantize_reference(data[w].contiguous(), scales[w].contiguous(), group_size, torch.float32)
    a = a / rows
    codes, s = quantize_reference(a, FORMAT_OF_DTYPE[data.dtype].name, group_size, False, 0)
    if residual is not None:
        error = a - dequantize_reference(codes, s, group_size, torch.float32)
        residual.add_((error * rows)[:residual.numel()])
    out_data.copy_(codes)
    out_scales.copy_(s)


def dequantize_into_reference(data: Tensor, scales: Tensor, group_size: int, out: Tensor) -> None:
    out.copy_(dequantize_reference(data, scales, group_size, out.dtype).view(out.shape))


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


def _written(name: str, t: Tensor, numel: int, dtype: torch.dtype, device: torch.device) -> Problems:
    """An output / in-out tensor of an ``*_into`` op: ``numel`` elements of ``dtype`` on ``device``, contiguous."""
    if not isinstance(t, Tensor):
        return [(TypeError, f"{name} must be a tensor, got {type(t).__name__}")]
    if t.dtype != dtype:
        return [(TypeError, f"{name} has dtype {t.dtype}; expected {dtype}")]
    if t.numel() != numel or t.device != device:
        return [(ValueError, f"{name} must hold {numel} elements on {device}, got {tuple(t.shape)} on {t.device}")]
    if not t.is_contiguous() or t.layout != torch.strided:
        return [(ValueError, f"{name} must be a dense contiguous tensor (strides {t.stride()})")]
    return []


def _quantize_into_problems(x: Tensor, residual: Optional[Tensor], data: Tensor, scales: Tensor, fmt: str,
                            group_size: int) -> Problems:
    out = _quantize_problems(x, fmt, group_size, False, 0)
    if out:
        return out
    if x.dtype == torch.float64:
        return [(TypeError, "dtype torch.float64 not supported (float32, bfloat16, float16)")]
    if residual is not None:
        out += _written("residual", residual, x.numel(), torch.float32, x.device)
    out += _written("data", data, x.numel(), FORMATS[fmt].dtype, x.device)
    return out + _written("scales", scales, num_groups(x.numel(), group_size), torch.float32, x.device)


def _rows(name: str, t: Tensor, dtypes: Tuple[torch.dtype, ...]) -> Problems:
    if not isinstance(t, Tensor):
        return [(TypeError, f"{name} must be a tensor, got {type(t).__name__}")]
    if t.dtype not in dtypes:
        return [(TypeError, f"{name} has dtype {t.dtype}; expected {' or '.join(str(d) for d in dtypes)}")]
    if t.dim() != 2 or t.shape[0] < 1 or (t.shape[1] > 1 and t.stride(1) != 1) or t.layout != torch.strided:
        return [(ValueError, f"{name} must be (rows >= 1, n) with contiguous rows, got shape {tuple(t.shape)} "
                             f"strides {t.stride() if t.layout == torch.strided else t.layout}")]
    return []


def _requantize_mean_problems(data: Tensor, scales: Tensor, out_data: Tensor, out_scales: Tensor,
                              residual: Optional[Tensor], group_size: int) -> Problems:
    out = _group_size_problems(group_size) + _rows("data", data, tuple(FORMAT_OF_DTYPE))
    out += _rows("scales", scales, (torch.float32,))
    if out:
        return out
    (rows, n), groups = data.shape, num_groups(data.shape[1], group_size)
    if scales.shape != (rows, groups) or scales.device != data.device:
        return [(ValueError, f"scales must be ({rows}, {groups}) float32 on {data.device} for data "
                             f"{tuple(data.shape)} in groups of {group_size}, got {tuple(scales.shape)} on "
                             f"{scales.device}")]
    out += _written("out_data", out_data, n, data.dtype, data.device)
    out += _written("out_scales", out_scales, groups, torch.float32, data.device)
    if isinstance(residual, Tensor) and residual.numel() > n:
        return out + [(ValueError, f"residual has {residual.numel()} elements, more than a row's {n}")]
    if residual is not None:
        out += _written("residual", residual, residual.numel() if isinstance(residual, Tensor) else 0, torch.float32,
                        data.device)
    return out


def _dequantize_into_problems(data: Tensor, scales: Tensor, group_size: int, out: Tensor) -> Problems:
    if not isinstance(out, Tensor):
        return [(TypeError, f"out must be a tensor, got {type(out).__name__}")]
    problems = _dequantize_problems(data, scales, group_size, out.dtype)
    if not problems and out.dtype == torch.float64:
        problems.append((TypeError, "output dtype torch.float64 not supported (float32, bfloat16, float16)"))
    return problems or _written("out", out, data.numel(), out.dtype, data.device)


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


def _written_fake(*args):
    return None


def _triton_quantize_into(x, residual, data, scales, fmt, group_size):
    from ..kernels.quantize import quantize_into
    quantize_into(x, residual, data, scales, FORMATS[fmt], group_size, False, 0)


def _triton_requantize_mean(data, scales, out_data, out_scales, residual, group_size):
    from ..kernels.quantize import requantize_mean
    requantize_mean(data, scales, out_data, out_scales, residual, FORMAT_OF_DTYPE[data.dtype], group_size)


def _triton_dequantize_into(data, scales, group_size, out):
    from ..kernels.quantize import dequantize_into
    dequantize_into(data, FORMAT_OF_DTYPE[data.dtype], scales, group_size, out)


define_op("quantize", QUANTIZE_SCHEMA, reference=quantize_reference, fake=_quantize_fake, triton=_triton_quantize)
define_op("dequantize", DEQUANTIZE_SCHEMA, reference=dequantize_reference, fake=_dequantize_fake,
          triton=_triton_dequantize)
define_op("quantize_into", QUANTIZE_INTO_SCHEMA, reference=quantize_into_reference, fake=_written_fake,
          triton=_triton_quantize_into)
define_op("requantize_mean", REQUANTIZE_MEAN_SCHEMA, reference=requantize_mean_reference, fake=_written_fake,
          triton=_triton_requantize_mean)
define_op("dequantize_into", DEQUANTIZE_INTO_SCHEMA, reference=dequantize_into_reference, fake=_written_fake,
          triton=_triton_dequantize_into)


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


def quantize_into(x: Tensor, residual: Optional[Tensor], data: Tensor, scales: Tensor, fmt: str, group_size: int, *,
                  impl: Optional[str] = None) -> None:
    """Quantize ``x`` ((n,) contiguous) into ``data`` ((n,) codes) and ``scales`` ((ceil(n / group_size),) float32);
    with ``residual`` ((n,) float32), quantize x + residual and leave the error in residual (module docstring)."""
    _raise_first("quantize_into", _quantize_into_problems(x, residual, data, scales, fmt, group_size))
    if x.numel():
        registry("quantize_into").select(x.device, x.dtype, impl).fn(x, residual, data, scales, fmt, group_size)


def requantize_mean(data: Tensor, scales: Tensor, out_data: Tensor, out_scales: Tensor, residual: Optional[Tensor],
                    group_size: int, *, impl: Optional[str] = None) -> None:
    """Quantize the float32 mean of the rows of ``data`` ((W, C) codes, (W, G) ``scales``) into ``out_data`` (C,)
    and ``out_scales`` (G,); ``residual`` (m <= C float32 elements), if given, gains W times the requantization
    error (module docstring)."""
    _raise_first("requantize_mean", _requantize_mean_problems(data, scales, out_data, out_scales, residual, group_size))
    if data.shape[1]:
        registry("requantize_mean").select(data.device, torch.float32, impl).fn(data, scales, out_data, out_scales,
                                                                                residual, group_size)


def dequantize_into(data: Tensor, scales: Tensor, group_size: int, out: Tensor, *, impl: Optional[str] = None) -> None:
    """``out := decode(data) * scale`` per element, in out's dtype (out: contiguous, data.numel() elements)."""
    _raise_first("dequantize_into", _dequantize_into_problems(data, scales, group_size, out))
    if data.numel():
        registry("dequantize_into").select(data.device, out.dtype, impl).fn(data, scales, group_size, out)
