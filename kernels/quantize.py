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


@triton.jit(do_not_specialize=["s0", "s1"])  # a seed word of 1 would become a constexpr: no .to() on it
def _fused_kernel(x, codes, scales, numel, group, s0, s1, FMT: tl.constexpr, QMAX: tl.constexpr,
                  STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = g * group + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group) & (offs < numel)
    v = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    scale, inv = _scale_inv(tl.max(_abs_bits(v), axis=0), QMAX)
    tl.store(scales + g, scale)
    tl.store(codes + offs, _codes(v, inv, offs, s0, s1, FMT, STOCHASTIC), mask=mask)


@triton.jit
def _piece_offsets(group, per_group, numel, PIECE_: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    g = p // per_group
    start = (p % per_group) * PIECE_
    local = start + tl.arange(0, PIECE_)
    offs = g * group + local
    return g, offs, (local < group) & (offs < numel)


@triton.jit
def _absmax_kernel(x, piece_max, numel, group, per_group, PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, numel, PIECE_)
    v = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(piece_max + tl.program_id(0), tl.max(_abs_bits(v), axis=0))


@triton.jit(do_not_specialize=["s0", "s1"])  # as _fused_kernel
def _cast_kernel(x, codes, scales, group_max, numel, group, per_group, s0, s1, FMT: tl.constexpr,
                 QMAX: tl.constexpr, STOCHASTIC: tl.constexpr, PIECE_: tl.constexpr):
    g, offs, mask = _piece_offsets(group, per_group, numel, PIECE_)
    scale, inv = _scale_inv(tl.load(group_max + g), QMAX)
    if tl.program_id(0) % per_group == 0:
        tl.store(scales + g, scale)
    v = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(codes + offs, _codes(v, inv, offs, s0, s1, FMT, STOCHASTIC), mask=mask)


def quantize(x: Tensor, spec, group_size: int, stochastic: bool, seed: int) -> Tuple[Tensor, Tensor]:
    """(codes shaped like x, (groups,) float32 scales) for contiguous x, in format ``spec``
    (a ``pytrain.ops.quantize.Format``: name, dtype, qmax); see ``quantize_reference``."""
    numel, groups = x.numel(), triton.cdiv(x.numel(), group_size)
    codes = torch.empty(x.shape, dtype=spec.dtype, device=x.device)
    scales = torch.empty(groups, dtype=torch.float32, device=x.device)
    if numel == 0:
        return codes, scales
    flat, out = x.reshape(-1), codes.view(torch.uint8).reshape(-1)
    s0, s1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    consts = dict(FMT=FMT_IDS[spec.name], QMAX=spec.qmax, STOCHASTIC=stochastic, num_warps=NUM_WARPS,
                  enable_fp_fusion=False)
    if group_size <= FUSED_MAX:
        _fused_kernel[(groups,)](flat, out, scales, numel, group_size, s0, s1,
                                 BLOCK=triton.next_power_of_2(group_size), **consts)
        return codes, scales
    per_group = triton.cdiv(group_size, PIECE)
    piece_max = torch.empty(groups * per_group, dtype=torch.int32, device=x.device)
    _absmax_kernel[(groups * per_group,)](flat, piece_max, numel, group_size, per_group, PIECE_=PIECE,
                                          num_warps=NUM_WARPS)
    group_max = piece_max.view(groups, per_group).amax(dim=1)
    _cast_kernel[(groups * per_group,)](flat, out, scales, group_max, numel, group_size, per_group, s0, s1,
                                        PIECE_=PIECE, **consts)
    return codes, scales


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
def _dequantize_kernel(codes, scales, out, numel, group, FMT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(codes + offs, mask=mask, other=0)
    if FMT == 0:
        v = c.to(tl.int8, bitcast=True).to(tl.float32)
    elif FMT == 1:
        v = _fp8_decode(c.to(tl.uint32), 3, 7, 0x7F)
    else:
        v = _fp8_decode(c.to(tl.uint32), 2, 15, 0x7C)
    scale = tl.load(scales + offs // group, mask=mask, other=0.0)
    tl.store(out + offs, (v * scale).to(out.dtype.element_ty), mask=mask)


def dequantize(data: Tensor, spec, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """decode(data) * scale of each element's group, shaped like data, in ``dtype``; ``spec``: data's format
    (see ``dequantize_reference``)."""
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    if data.numel() == 0:
        return out
    _dequantize_kernel[(triton.cdiv(data.numel(), PIECE),)](
        data.view(torch.uint8).reshape(-1), scales, out.reshape(-1), data.numel(), group_size, FMT=FMT_IDS[spec.name],
        BLOCK=PIECE, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out
