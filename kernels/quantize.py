"""Triton 8-bit quantize / dequantize (int8, fp8 e4m3 / e5m2) with one float32 scale per group of
``group_size`` consecutive elements.  Contract (special values, stochastic rounding): pytrain/ops/quantize.py.

Groups of up to FUSED_MAX elements: one program per group loads it once, takes the absmax, the scale
and casts (one pass over memory).  Larger groups (per-tensor scales): ``_absmax_kernel`` writes the
absmax of every PIECE-element piece, torch reduces the pieces of each group (an integer max), then
``_cast_kernel`` casts each piece with its group's scale.

The absmax is an integer max over the magnitude bits (NaN and inf sort above every finite value);
the fp8 casts are integer arithmetic (round to nearest even, saturating), as in csrc/cpu/quantize.cpp,
and the codes are stored through a uint8 view, so the interpreter and the GPU give the reference's
codes bit for bit.  Divisions are IEEE-rounded (div_rn) and launches disable FMA fusion: y = x * inv
is rounded before the stochastic-rounding difference y - rint(y).

The codec ops of the quantized all-reduce hook reuse these kernels: ``quantize_into`` (HAS_RESIDUAL: y = x + r,
and r := y - dequantized codes in the same program; phase one of large groups stores y into r), ``dequantize_into``
(the dequantize kernel into a given tensor) and ``requantize_mean`` (the W rows' dequantized mean, computed
again by each phase, quantized as above, with r += W (mean - dequantized) on the first m elements).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .adamw import round_half_even
from .hash import lowbias32

FUSED_MAX = 4096  # largest group handled by one program in one load
PIECE = 4096      # elements per program for larger groups and for dequantize
NUM_WARPS = 4
FMT_IDS = {"int8": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}
ABS_MASK: tl.constexpr = tl.constexpr(0x7FFFFFFF)
INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)


@triton.jit
def _abs_bits(x):
    return x.to(tl.int32, bitcast=True) & ABS_MASK


@triton.jit
def _scale_inv(amax_bits, QMAX: tl.constexpr):
    """(stored scale, inv): NaN / 0 for non-finite groups, 0 / 0 below qmax * 2^-126, else amax / qmax, qmax / amax."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    live = (amax_bits < INF_BITS) & (amax >= QMAX * 1.1754943508222875e-38)
    safe = tl.where(live, amax, 1.0)
    scale = tl.where(live, tl.div_rn(safe, QMAX), tl.where(amax_bits < INF_BITS, 0.0, float("nan")))
    return scale, tl.where(live, tl.div_rn(QMAX + 0.0 * safe, safe), 0.0)


@triton.jit
def _fp8_encode(y, M: tl.constexpr, B: tl.constexpr, MAX_CODE: tl.constexpr, MAX_BITS: tl.constexpr):
    """Round-to-nearest-even saturating fp32 -> fp8 (M mantissa bits, bias B) code, as uint32."""
    u = y.to(tl.uint32, bitcast=True)
    a = u & ABS_MASK
    shift: tl.constexpr = 23 - M
    normal = ((a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift) - ((127 - B) << M)
    magic_bits: tl.constexpr = (127 - B + 23 - M + 1) << 23
    magic = tl.full(a.shape, magic_bits, tl.uint32).to(tl.float32, bitcast=True)
    subnormal = (a.to(tl.float32, bitcast=True) + magic).to(tl.uint32, bitcast=True) - magic_bits
    mag = tl.where(a >= MAX_BITS, MAX_CODE, tl.where(a >= ((127 - B + 1) << 23), normal, subnormal))
    return ((u >> 24) & 0x80) | mag


@triton.jit
def _codes(x, inv, offs, s0, s1, FMT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """uint8 bytes of the codes of fp32 x with its group's inv (0: all codes 0)."""
    y = tl.where(inv != 0.0, x, 0.0) * inv  # non-finite groups have inv 0: no inf * 0
    if FMT == 0:
        r = round_half_even(y)
        if STOCHASTIC:
            d = y - r
            idx = offs.to(tl.uint64)
            lo = (idx & 0xFFFFFFFF).to(tl.uint32)
            hi = (idx >> 32).to(tl.uint32)
            u24 = lowbias32(lowbias32(lo ^ s0.to(tl.uint32)) ^ hi ^ s1.to(tl.uint32)) >> 8
            up = (u24.to(tl.float32) < tl.abs(d) * 16777216.0).to(tl.float32)
            r = r + tl.where(d < 0.0, -up, up)
        code = tl.clamp(r, -127.0, 127.0).to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True)
    elif FMT == 1:
        code = _fp8_encode(y, 3, 7, 0x7E, 0x43E00000).to(tl.uint8)
    else:
        code = _fp8_encode(y, 2, 15, 0x7B, 0x47600000).to(tl.uint8)
    return code


@triton.jit
def _input(x, residual, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """fp32 values to quantize: x, or x + r (error feedback)."""
    v = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v = v + tl.load(residual + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _feed_back(residual, offs, mask, y, code, scale, FMT: tl.constexpr):
    """r := y - dequantized code."""
    tl.store(residual + offs, y - _decode(code, FMT) * scale, mask=mask)


@triton.jit(do_not_specialize=["s0", "s1"])  # a seed word of 1 would become a constexpr: no .to() on it
def _fused_kernel(x, residual, codes, scales, numel, group, s0, s1, FMT: tl.constexpr, QMAX: tl.constexpr,
                  STOCHASTIC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = g * group + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group) & (offs < numel)
    v = _input(x, residual, offs, mask, HAS_RESIDUAL)
    scale, inv = _scale_inv(tl.max(_abs_bits(v), axis=0), QMAX)
    tl.store(scales + g, scale)
    code = _codes(v, inv, offs, s0, s1, FMT, STOCHASTIC)
    tl.store(codes + offs, code, mask=mask)
    if HAS_RESIDUAL:
        _feed_back(residual, offs, mask, v, code, scale, FMT)


@triton.jit
def _piece_offsets(group, per_group, numel, PIECE_: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    g = p // per_group
    start = (p % per_group) * PIECE_
    local = start + tl.arange(0, PIECE_)
    offs = g * group + local
    return g, offs, (local < group) & (offs < numel)


@triton.jit
def _absmax_kernel(x, residual, piece_max, numel, group, per_group, HAS_RESIDUAL: tl.constexpr,
                   PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, numel, PIECE_)
    v = _input(x, residual, offs, mask, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(residual + offs, v, mask=mask)  # y, which the cast reads
    tl.store(piece_max + tl.program_id(0), tl.max(_abs_bits(v), axis=0))


@triton.jit(do_not_specialize=["s0", "s1"])  # as _fused_kernel
def _cast_kernel(x, residual, codes, scales, group_max, numel, group, per_group, s0, s1, FMT: tl.constexpr,
                 QMAX: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, numel, PIECE_)
    scale, inv = _scale_inv(tl.load(group_max + g), QMAX)
    if tl.program_id(0) % per_group == 0:
        tl.store(scales + g, scale)
    if HAS_RESIDUAL:
        v = tl.load(residual + offs, mask=mask, other=0.0)
    else:
        v = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    code = _codes(v, inv, offs, s0, s1, FMT, STOCHASTIC)
    tl.store(codes + offs, code, mask=mask)
    if HAS_RESIDUAL:
        _feed_back(residual, offs, mask, v, code, scale, FMT)


def quantize(x: Tensor, spec, group_size: int, stochastic: bool, seed: int) -> Tuple[Tensor, Tensor]:
    """(codes shaped like x, (groups,) float32 scales) for contiguous x, in format ``spec``
    (a ``pytrain.ops.quantize.Format``: name, dtype, qmax); see ``quantize_reference``."""
    codes = torch.empty(x.shape, dtype=spec.dtype, device=x.device)
    scales = torch.empty(triton.cdiv(x.numel(), group_size), dtype=torch.float32, device=x.device)
    quantize_into(x, None, codes, scales, spec, group_size, stochastic, seed)
    return codes, scales


def quantize_into(x: Tensor, residual, codes: Tensor, scales: Tensor, spec, group_size: int, stochastic: bool,
                  seed: int) -> None:
    """quantize(x) into contiguous codes / scales; with ``residual`` (float32 like x) quantize x + r and leave
    r := (x + r) - dequantized codes (see ``quantize_into_reference``)."""
    numel, groups = x.numel(), triton.cdiv(x.numel(), group_size)
    if numel == 0:
        return
    flat, out = x.reshape(-1), codes.view(torch.uint8).reshape(-1)
    r = flat if residual is None else residual.reshape(-1)  # a placeholder pointer when there is none
    s0, s1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    consts = dict(FMT=FMT_IDS[spec.name], QMAX=spec.qmax, STOCHASTIC=stochastic, HAS_RESIDUAL=residual is not None,
                  num_warps=NUM_WARPS, enable_fp_fusion=False)
    if group_size <= FUSED_MAX:
        _fused_kernel[(groups,)](flat, r, out, scales, numel, group_size, s0, s1,
                                 BLOCK=triton.next_power_of_2(group_size), **consts)
        return
    per_group = triton.cdiv(group_size, PIECE)
    piece_max = torch.empty(groups * per_group, dtype=torch.int32, device=x.device)
    _absmax_kernel[(groups * per_group,)](flat, r, piece_max, numel, group_size, per_group,
                                          HAS_RESIDUAL=residual is not None, PIECE_=PIECE, num_warps=NUM_WARPS,
                                          enable_fp_fusion=False)
    group_max = piece_max.view(groups, per_group).amax(dim=1)
    _cast_kernel[(groups * per_group,)](flat, r, out, scales, group_max, numel, group_size, per_group, s0, s1,
                                        PIECE_=PIECE, **consts)


@triton.jit
def _fp8_decode(c, M: tl.constexpr, B: tl.constexpr, SPECIAL: tl.constexpr):
    """fp8 byte (as uint32) -> fp32: normal, subnormal (mantissa * 2^(1 - B - M)), inf / NaN."""
    mag = c & 0x7F
    normal = (mag << (23 - M)) + ((127 - B) << 23)
    if SPECIAL == 0x7F:
        special = tl.full(mag.shape, 0x7FC00000, tl.uint32)
    else:
        special = (mag << (23 - M)) | INF_BITS
    step: tl.constexpr = 2.0 ** (1 - B - M)
    subnormal = (mag.to(tl.float32) * step).to(tl.uint32, bitcast=True)
    bits = tl.where(mag >= SPECIAL, special, tl.where(mag >= (1 << M), normal, subnormal))
    return (((c & 0x80) << 24) | bits).to(tl.float32, bitcast=True)


@triton.jit
def _decode(c, FMT: tl.constexpr):
    """fp32 value of code bytes c (uint8)."""
    if FMT == 0:
        v = c.to(tl.int8, bitcast=True).to(tl.float32)
    elif FMT == 1:
        v = _fp8_decode(c.to(tl.uint32), 3, 7, 0x7F)
    else:
        v = _fp8_decode(c.to(tl.uint32), 2, 15, 0x7C)
    return v


@triton.jit
def _dequantize_kernel(codes, scales, out, numel, group, FMT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = _decode(tl.load(codes + offs, mask=mask, other=0), FMT)
    scale = tl.load(scales + offs // group, mask=mask, other=0.0)
    tl.store(out + offs, (v * scale).to(out.dtype.element_ty), mask=mask)


def dequantize(data: Tensor, spec, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """decode(data) * scale of each element's group, shaped like data, in ``dtype``; ``spec``: data's format
    (see ``dequantize_reference``)."""
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    dequantize_into(data, spec, scales, group_size, out)
    return out


def dequantize_into(data: Tensor, spec, scales: Tensor, group_size: int, out: Tensor) -> None:
    """out (contiguous, data's numel) := decode(data) * scale of each element's group, in out's dtype."""
    if data.numel() == 0:
        return
    _dequantize_kernel[(triton.cdiv(data.numel(), PIECE),)](
        data.view(torch.uint8).reshape(-1), scales, out.reshape(-1), data.numel(), group_size, FMT=FMT_IDS[spec.name],
        BLOCK=PIECE, num_warps=NUM_WARPS, enable_fp_fusion=False)


# ------------------------------------------------------------------------------------------ requantize_mean
@triton.jit
def _mean(data, scales, offs, mask, g, rows, row_stride, scale_stride, FMT: tl.constexpr):
    """(sum over rows w of decode(data[w, offs]) * scales[w, g]) / rows, summed in row order."""
    a = _decode(tl.load(data + offs, mask=mask, other=0), FMT) * tl.load(scales + g)
    for w in range(1, rows):
        c = tl.load(data + w * row_stride + offs, mask=mask, other=0)
        a = a + _decode(c, FMT) * tl.load(scales + w * scale_stride + g)
    return tl.div_rn(a, tl.zeros_like(a) + rows.to(tl.float32))


@triton.jit
def _mean_feed_back(residual, offs, m, a, code, scale, rows, FMT: tl.constexpr):
    """r += rows * (a - dequantized code) on elements below m."""
    keep = offs < m
    r = tl.load(residual + offs, mask=keep, other=0.0)
    tl.store(residual + offs, r + rows.to(tl.float32) * (a - _decode(code, FMT) * scale), mask=keep)


@triton.jit(do_not_specialize=["rows"])  # rows = 1 would become a constexpr: no .to() on it
def _mean_fused_kernel(data, scales, codes, out_scales, residual, n, m, group, rows, row_stride, scale_stride,
                       FMT: tl.constexpr, QMAX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = g * group + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group) & (offs < n)
    a = _mean(data, scales, offs, mask, g, rows, row_stride, scale_stride, FMT)
    scale, inv = _scale_inv(tl.max(_abs_bits(a), axis=0), QMAX)
    tl.store(out_scales + g, scale)
    code = _codes(a, inv, offs, 0, 0, FMT, False)
    tl.store(codes + offs, code, mask=mask)
    if HAS_RESIDUAL:
        _mean_feed_back(residual, offs, m, a, code, scale, rows, FMT)


@triton.jit(do_not_specialize=["rows"])  # as _mean_fused_kernel
def _mean_absmax_kernel(data, scales, piece_max, n, group, per_group, rows, row_stride, scale_stride,
                        FMT: tl.constexpr, PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, n, PIECE_)
    a = _mean(data, scales, offs, mask, g, rows, row_stride, scale_stride, FMT)
    tl.store(piece_max + tl.program_id(0), tl.max(_abs_bits(a), axis=0))


@triton.jit(do_not_specialize=["rows"])  # as _mean_fused_kernel
def _mean_cast_kernel(data, scales, codes, out_scales, residual, group_max, n, m, group, per_group, rows, row_stride,
                      scale_stride, FMT: tl.constexpr, QMAX: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, n, PIECE_)
    scale, inv = _scale_inv(tl.load(group_max + g), QMAX)
    if tl.program_id(0) % per_group == 0:
        tl.store(out_scales + g, scale)
    a = _mean(data, scales, offs, mask, g, rows, row_stride, scale_stride, FMT)  # recomputed: same values
    code = _codes(a, inv, offs, 0, 0, FMT, False)
    tl.store(codes + offs, code, mask=mask)
    if HAS_RESIDUAL:
        _mean_feed_back(residual, offs, m, a, code, scale, rows, FMT)


def requantize_mean(data: Tensor, scales: Tensor, out_data: Tensor, out_scales: Tensor, residual, spec,
                    group_size: int) -> None:
    """quantize((sum of the rows' dequantized values) / rows) into out_data / out_scales (data (W, n) and
    scales (W, groups) with contiguous rows); residual (m <= n float32) += W * (mean - dequantized)."""
    rows, n = data.shape
    if n == 0:
        return
    groups = triton.cdiv(n, group_size)
    codes, out = data.view(torch.uint8), out_data.view(torch.uint8)
    r = out_scales if residual is None else residual  # a placeholder pointer when there is none
    m = 0 if residual is None else residual.numel()
    strides = (rows, codes.stride(0), scales.stride(0))
    consts = dict(FMT=FMT_IDS[spec.name], num_warps=NUM_WARPS, enable_fp_fusion=False)
    if group_size <= FUSED_MAX:
        _mean_fused_kernel[(groups,)](codes, scales, out, out_scales, r, n, m, group_size, *strides, QMAX=spec.qmax,
                                      HAS_RESIDUAL=residual is not None,
                                      BLOCK=triton.next_power_of_2(group_size), **consts)
        return
    per_group = triton.cdiv(group_size, PIECE)
    piece_max = torch.empty(groups * per_group, dtype=torch.int32, device=data.device)
    _mean_absmax_kernel[(groups * per_group,)](codes, scales, piece_max, n, group_size, per_group, *strides,
                                               PIECE_=PIECE, **consts)
    group_max = piece_max.view(groups, per_group).amax(dim=1)
    _mean_cast_kernel[(groups * per_group,)](codes, scales, out, out_scales, r, group_max, n, m, group_size,
                                             per_group, *strides, QMAX=spec.qmax, HAS_RESIDUAL=residual is not None,
                                             PIECE_=PIECE, **consts)
