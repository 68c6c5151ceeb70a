"""Triton flash attention, forward and backward (FlashAttention-2: Dao 2023, arXiv:2307.08691).

The contract (maths, masks, GQA, bottom-right causal alignment, sliding windows, rows with no key,
and the stateless dropout hash) is ``pytrain/ops/attention.py``.  In short, per (batch b,
query head h, kv head h // GROUP), with shift = Lk - Lq:

    S[i, j] = scale * q[i] . k[j],   allowed(i, j) = j - i - shift in [-left, right]
    lse[i]  = log sum_{allowed j} exp(S[i, j])                 (-inf when row i allows no key)
    P[i, j] = exp(S[i, j] - lse[i]) on allowed (i, j), else 0
    out[i]  = sum_j P[i, j] * keep(b*H + h, i, j) / (1 - p) * v[j]   (rows with no key: 0)

Forward (``_attn_fwd_kernel``, one program per BLOCK_M query rows of one head): loops over key blocks
keeping the running row max m, row sum l and unnormalised output acc (online softmax); exponentials
are exp2((S - m) * log2 e) on the hardware.  Lq x Lk is never materialised; out = acc / l,
lse = m + ln l.  Dropout drops terms of acc but not of l.

Any finite scores: S is the product scale * (q . k) rounded to float32 by itself (``_scaled``: mul.rn,
which neither LLVM nor ptxas fuses into the subtraction that follows), and m and lse are kept in
natural-log units, the units of S.  The row maximum then has S - m = 0 exactly, lse >= m, and the
backward, recomputing the same S (float32 dots are FMA chains over d in one order in every kernel),
gets S - lse = -ln l <= 0 for the top score, however large the scores (a log2-domain lse converted
with ln 2 / log2 e is off by ulps of |S|: about 2^9 at |S| = 1e10, and 2^(+-512) is no probability).

Backward, with delta[i] = rowsum(dO[i] * O[i]) (``_attn_bwd_preprocess_kernel``) and P recomputed
from q, k and lse:

    dV[j] = sum_i Pd[i, j] dO[i],          Pd = P * keep / (1 - p)
    dP[i, j] = dO[i] . v[j] * keep / (1 - p)
    dS[i, j] = P[i, j] (dP[i, j] - delta[i])
    dK[j] = scale * sum_i dS[i, j] q[i],  dQ[i] = scale * sum_j dS[i, j] k[j]

``_attn_bwd_dkdv_kernel`` runs one program per BLOCK_N keys of one kv head and loops over the GROUP
query heads sharing that kv head, then over their query blocks: dK and dV of a GQA/MQA kv head are
summed inside one program, in a fixed order, with no atomics and no repeated k/v in memory.
``_attn_bwd_dq_kernel`` runs one program per BLOCK_M query rows and loops over key blocks.  Both are
deterministic (bit-identical across runs).

Band skipping (causal / sliding window): allowed keys of query rows [m0, m1) lie in
[m0 + shift - left, m1 - 1 + shift + right], so the key loop runs over those blocks only (and the
query loop of dK/dV over the mirror range); blocks entirely outside the band are never visited.
The visited range is split in three: blocks cut by the band's lower edge (masked), blocks wholly
inside the band and the sequence (no mask computed at all, unmasked loads), blocks cut by the upper
edge or the sequence end (masked).

Dropout mask, identical to the reference: x = h(j ^ s0); x = h(x ^ i); x = h(x ^ bh ^ s1) with h the
lowbias32 hash on uint32, s0/s1 the low/high 32 bits of the seed, bh = b*H + h and i, j absolute
indices; keep when x >= min(int(p * 2^32), 2^32 - 1).  h(j ^ s0) is computed once per key block.

Head dims 16..256: the D tile is the next power of two, masked when it is wider than D (EVEN_D
constexpr otherwise).  All accumulation is float32; float16/bfloat16 tiles are multiplied on tensor
cores (P and dS rounded to the input dtype for the dot, as in FlashAttention), float32 inputs with
IEEE float32 dots (no TF32), so float32 results are float32-accurate.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton.language.extra import libdevice

from .hash import lowbias32

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MASK32 = 0xFFFFFFFF

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit chooses interpreted or compiled kernels when this module is imported: so does this constant.
_INTERPRETED = tl.constexpr(_interpreted())


# ---------------------------------------------------------------------------------------------- configs
# Launch configs are data (attention_configs.json beside this file: per kernel, D tile and dtype class,
# with how they were chosen), so tuning on a GPU changes no code.
_CONFIGS = json.loads((Path(__file__).parent / "attention_configs.json").read_text())
# Rows of O / dO per program of the delta = rowsum(dO * O) preprocessing.
PREPROCESS_BLOCK_M = 64


def _dtype_class(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "16-bit"


def attention_config(kernel: str, head_dim: int, dtype: torch.dtype) -> Dict[str, int]:
    """Launch config of ``kernel`` ("fwd", "dkdv" or "dq") for a head dim and dtype.

    Returns BLOCK_M (query rows per tile), BLOCK_N (key rows per tile), num_warps, num_stages.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreted():  # speed does not matter there; 32-row tiles keep the small test shapes multi-block
        bm, bn, warps, stages = _CONFIGS["interpret"]
    else:
        bm, bn, warps, stages = _CONFIGS["tiles"][kernel][_dtype_class(dtype)][str(block_d)]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def _autotune_enabled() -> bool:
    return not _interpreted() and os.environ.get("PYTRAIN_ATTENTION_AUTOTUNE", "0") == "1"


# ------------------------------------------------------------------------------------- device helpers
@triton.jit
def _keep(hj, i, bh_s1, threshold):
    """Dropout keep mask from hj = h(j ^ s0) and row indices i (broadcast), bh_s1 = bh ^ s1."""
    x = lowbias32(hj ^ i.to(tl.uint32))
    x = lowbias32(x ^ bh_s1)
    return x >= threshold


@triton.jit
def _scaled(x, scale):
    """scale * x rounded to float32 on its own (mul.rn when compiled: never contracted into an FMA with a
    later add, which would leave the row maximum's S - m at a rounding residual of up to ulp(S) / 2).  The
    interpreter (numpy) rounds every operation anyway and has no libdevice."""
    if _INTERPRETED:
        return x * scale
    return libdevice.mul_rn(x, scale)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with float32 accumulation.  DOT_UPCAST (set only under TRITON_INTERPRET=1 for bfloat16, whose
    interpreted tl.dot is wrong in Triton 3.8) multiplies the float32 images instead: the same products,
    since bfloat16 x bfloat16 is exact in float32."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _scores(a, b, scale, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """S = scale * (a @ b^T) for a (X, BLOCK_D) and b (Y, BLOCK_D) tiles: the same float32 value for a pair of rows
    whichever side a query is on (the forward's q k^T and the dK/dV kernel's k q^T), since the backward's
    P = exp(S - lse) needs the forward's S to the last bit when |S| is large.  Compiled, tl.dot's float32 product
    is an FMA chain over d in one order either way; interpreted, tl.dot is numpy's BLAS, whose summation order
    depends on the operands' shapes and the CPU's kernels (AVX2 and AVX-512 differ), so the interpreter sums
    the products itself, over d in one order."""
    if _INTERPRETED:
        s = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    else:
        s = _dot(a, tl.trans(b), DOT_PRECISION, DOT_UPCAST)
    return _scaled(s, scale)


@triton.jit
def _load_rows(base, rows, stride, offs_d, n_rows, D, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """Tile base[rows, :D] (rows x BLOCK_D), zero outside [0, n_rows) x [0, D)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, offs_d, n_rows, D, x, EVEN_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    x = x.to(base.dtype.element_ty)
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def _allowed(i, j, Lq, Lk, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """allowed(i, j) & (i < Lq) & (j < Lk) for broadcastable index tensors i, j."""
    ok = (i < Lq) & (j < Lk)
    rel = j - i - shift
    if HAS_RIGHT:
        ok = ok & (rel <= right)
    if HAS_LEFT:
        ok = ok & (rel >= -left)
    return ok


@triton.jit
def _segments(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the blocks covering [lo, hi) into [lo, full_lo) masked, [full_lo, full_hi) unmasked and
    [full_hi, hi) masked.  full_lo / full_hi: every block starting at or after full_lo and every block
    ending at or before full_hi passes the mask-free test (thresholds, not yet block-aligned)."""
    lo = (tl.maximum(lo, 0) // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo)
    hi_up = ((hi + BLOCK - 1) // BLOCK) * BLOCK
    full_lo = ((tl.maximum(full_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_up)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_up)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_range(m0, Lq, Lk, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block segments for query rows [m0, m0 + BLOCK_M) (forward and dQ)."""
    m_last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    zero = m0 * 0
    if HAS_LEFT:
        lo = m0 + shift - left
        full_lo = m_last + shift - left  # keys >= this are right of every row's lower edge
    else:
        lo = zero
        full_lo = zero
    if HAS_RIGHT:
        hi = tl.minimum(m_last + shift + right + 1, Lk)
        full_hi = tl.minimum(m0 + shift + right + 1, Lk)  # keys < this are left of every row's upper edge
    else:
        hi = zero + Lk
        full_hi = zero + Lk
    return _segments(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _query_range(n0, Lq, Lk, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block segments for key rows [n0, n0 + BLOCK_N) (dK, dV): the mirror of ``_key_range``."""
    n_last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    zero = n0 * 0
    if HAS_RIGHT:
        lo = n0 - shift - right
        full_lo = n_last - shift - right
    else:
        lo = zero
        full_lo = zero
    if HAS_LEFT:
        hi = tl.minimum(n_last - shift + left + 1, Lq)
        full_hi = tl.minimum(n0 - shift + left + 1, Lq)
    else:
        hi = zero + Lq
        full_hi = zero + Lq
    return _segments(lo, hi, full_lo, full_hi, BLOCK_M)


# ------------------------------------------------------------------------------------------ launch grid
# CUDA grids allow 2^31 - 1 programs on axis 0 but only 65535 on axes 1 and 2, so batch * heads (which
# reaches 65536 at, e.g., batch 2048 x 32 heads) never goes on axis 1: every kernel runs a 1-D grid of
# n_tiles * n_heads programs, head-major with the row tiles of one head fastest (consecutive programs
# share k / v, as the 2-D grid's x-fastest order did).
MAX_GRID_X = 2**31 - 1


def launch_grid(n_rows: int, block: int, n_heads: int) -> Tuple[int]:
    """Grid of a kernel over ``n_heads`` (batch * heads) times cdiv(n_rows, block) row tiles."""
    programs = triton.cdiv(n_rows, block) * n_heads
    if programs > MAX_GRID_X:
        raise RuntimeError(f"attention (triton): {n_heads} heads x {triton.cdiv(n_rows, block)} tiles of {block} rows "
                           f"need {programs} programs, over CUDA's grid limit {MAX_GRID_X}")
    return (programs,)


@triton.jit
def _tile_and_head(n_rows, BLOCK: tl.constexpr):
    """(first row of this program's tile, flat head index b * heads + h) in the grid of ``launch_grid``."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_rows, BLOCK)
    return (pid % n_tiles) * BLOCK, pid // n_tiles


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start, end, Lq, Lk, D,
               shift, left, right, scale, s0, bh_s1, threshold, MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, Lk, D, MASK, EVEN_D)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, Lk, D, MASK, EVEN_D)
        s = _scores(q, k, scale, DOT_PRECISION, DOT_UPCAST)
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no -inf - -inf
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2((s - m_use[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            hj = lowbias32(offs_n.to(tl.uint32) ^ s0)
            p = tl.where(_keep(hj[None, :], offs_m[:, None], bh_s1, threshold), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])  # seed 1 would become a constexpr
def _attn_fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, H, GROUP, Lq,
                     Lk, D, scale, left, right, seed_lo, seed_hi, threshold, drop_scale, L_BUCKET,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0, bh = _tile_and_head(Lq, BLOCK_M)  # bh = b * H + h
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    shift = Lk - Lq
    s0 = seed_lo.to(tl.uint32)
    bh_s1 = bh.to(tl.uint32) ^ seed_hi.to(tl.uint32)
    thr = threshold.to(tl.uint32)

    q = _load_rows(q_base, offs_m, sqm, offs_d, Lq, D, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(m0, Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, offs_m, offs_d, lo, full_lo, Lq, Lk, D,
                               shift, left, right, scale, s0, bh_s1, thr, True, HAS_LEFT, HAS_RIGHT, DROPOUT,
                               EVEN_D, BLOCK_N, DOT_PRECISION, DOT_UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, offs_m, offs_d, full_lo, full_hi, Lq, Lk,
                               D, shift, left, right, scale, s0, bh_s1, thr, False, HAS_LEFT, HAS_RIGHT, DROPOUT,
                               EVEN_D, BLOCK_N, DOT_PRECISION, DOT_UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skn, svn, offs_m, offs_d, full_hi, hi, Lq, Lk, D,
                               shift, left, right, scale, s0, bh_s1, thr, True, HAS_LEFT, HAS_RIGHT, DROPOUT,
                               EVEN_D, BLOCK_N, DOT_PRECISION, DOT_UPCAST)

    empty = l_i == 0.0  # l >= 1 as soon as a row has one allowed key
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * (drop_scale / l_safe)[:, None]
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * LN2)
    _store_rows(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, offs_m, som, offs_d, Lq, D, acc, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, Lq, D, BLOCK_M: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d] in float32."""
    m0, bh = _tile_and_head(Lq, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, offs_m, som, offs_d, Lq, D, True, False)
    do = _load_rows(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, offs_m, sdm, offs_d, Lq, D, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _load_row_stats(LSE, DELTA, offs_m, Lq, MASK: tl.constexpr):
    """lse (+inf for rows with no key or past Lq, so that P = 0 there) and delta."""
    if MASK:
        lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=offs_m < Lq, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse, delta


@triton.jit
def _probs(s, lse):
    """P = exp(S - lse), the forward's probabilities recomputed.  S - lse <= 0 when S is the forward's S; should a
    recomputed S differ from it by rounding (tensor-core summation orders), P stays <= 1 instead of overflowing."""
    x = s - lse
    return tl.math.exp2(tl.where(x > 0.0, 0.0, x) * LOG2E)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sdm, offs_n, offs_d, start, end, Lq,
                Lk, D, shift, left, right, scale, hj, bh_s1, threshold, drop_scale, MASK: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N x BLOCK_D) of one key block over the query blocks in [start, end)."""
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, sqm, offs_d, Lq, D, MASK, EVEN_D)
        do = _load_rows(do_base, offs_m, sdm, offs_d, Lq, D, MASK, EVEN_D)
        lse, delta = _load_row_stats(lse_base, delta_base, offs_m, Lq, MASK)
        s_t = _scores(k, q, scale, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_N, BLOCK_M)
        if MASK:
            ok = _allowed(offs_m[None, :], offs_n[:, None], Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT)
            s_t = tl.where(ok, s_t, float("-inf"))
        p_t = _probs(s_t, lse[None, :])
        dp_t = _dot(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)
        if DROPOUT:
            keep = _keep(hj[:, None], offs_m[None, :], bh_s1, threshold)
            pd_t = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            pd_t = p_t
        dv += _dot(pd_t.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])  # seed 1 would become a constexpr
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh,
                          sdm, H, HKV, GROUP, Lq, Lk, D, scale, left, right, seed_lo, seed_hi, threshold,
                          drop_scale, L_BUCKET, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                          DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """dK, dV of keys [n0, n0 + BLOCK_N) of kv head hk: summed over its GROUP query heads in order."""
    n0, bhk = _tile_and_head(Lk, BLOCK_N)  # bhk = b * HKV + hk
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    shift = Lk - Lq
    k = _load_rows(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh, offs_n, skn, offs_d, Lk, D, True, EVEN_D)
    v = _load_rows(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, offs_n, svn, offs_d, Lk, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    hj = lowbias32(offs_n.to(tl.uint32) ^ seed_lo.to(tl.uint32))
    thr = threshold.to(tl.uint32)

    lo, full_lo, full_hi, hi = _query_range(n0, Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        bh_s1 = bh.to(tl.uint32) ^ seed_hi.to(tl.uint32)
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        lse_base = LSE + bh.to(tl.int64) * Lq
        delta_base = DELTA + bh.to(tl.int64) * Lq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sdm, offs_n, offs_d, lo,
                             full_lo, Lq, Lk, D, shift, left, right, scale, hj, bh_s1, thr, drop_scale, True,
                             HAS_LEFT, HAS_RIGHT, DROPOUT, EVEN_D, BLOCK_M, DOT_PRECISION, DOT_UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sdm, offs_n, offs_d, full_lo,
                             full_hi, Lq, Lk, D, shift, left, right, scale, hj, bh_s1, thr, drop_scale, False,
                             HAS_LEFT, HAS_RIGHT, DROPOUT, EVEN_D, BLOCK_M, DOT_PRECISION, DOT_UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sdm, offs_n, offs_d, full_hi,
                             hi, Lq, Lk, D, shift, left, right, scale, hj, bh_s1, thr, drop_scale, True,
                             HAS_LEFT, HAS_RIGHT, DROPOUT, EVEN_D, BLOCK_M, DOT_PRECISION, DOT_UPCAST)

    # dK, dV are contiguous (B, HKV, Lk, D), like k and v after the launcher's checks.
    out_off = bhk.to(tl.int64) * Lk * D
    _store_rows(DK + out_off, offs_n, D, offs_d, Lk, D, dk * scale, EVEN_D)
    _store_rows(DV + out_off, offs_n, D, offs_d, Lk, D, dv, EVEN_D)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, offs_m, offs_d, start, end, Lq, Lk, D, shift, left,
              right, scale, s0, bh_s1, threshold, drop_scale, MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, skn, offs_d, Lk, D, MASK, EVEN_D)
        v = _load_rows(v_base, offs_n, svn, offs_d, Lk, D, MASK, EVEN_D)
        s = _scores(q, k, scale, DOT_PRECISION, DOT_UPCAST)
        if MASK:
            ok = _allowed(offs_m[:, None], offs_n[None, :], Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        p = _probs(s, lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)
        if DROPOUT:
            hj = lowbias32(offs_n.to(tl.uint32) ^ s0)
            dp = tl.where(_keep(hj[None, :], offs_m[:, None], bh_s1, threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)
    return dq


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])  # seed 1 would become a constexpr
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, H,
                        GROUP, Lq, Lk, D, scale, left, right, seed_lo, seed_hi, threshold, drop_scale,
                        L_BUCKET, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of query rows [m0, m0 + BLOCK_M) of head h, over the key blocks of its band."""
    m0, bh = _tile_and_head(Lq, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    shift = Lk - Lq
    q = _load_rows(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, offs_m, sqm, offs_d, Lq, D, True, EVEN_D)
    do = _load_rows(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, offs_m, sdm, offs_d, Lq, D, True, EVEN_D)
    lse, delta = _load_row_stats(LSE + bh.to(tl.int64) * Lq, DELTA + bh.to(tl.int64) * Lq, offs_m, Lq, True)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    s0 = seed_lo.to(tl.uint32)
    bh_s1 = bh.to(tl.uint32) ^ seed_hi.to(tl.uint32)
    thr = threshold.to(tl.uint32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, full_lo, full_hi, hi = _key_range(m0, Lq, Lk, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, offs_m, offs_d, lo, full_lo, Lq, Lk, D, shift,
                   left, right, scale, s0, bh_s1, thr, drop_scale, True, HAS_LEFT, HAS_RIGHT, DROPOUT, EVEN_D,
                   BLOCK_N, DOT_PRECISION, DOT_UPCAST)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, offs_m, offs_d, full_lo, full_hi, Lq, Lk, D,
                   shift, left, right, scale, s0, bh_s1, thr, drop_scale, False, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   EVEN_D, BLOCK_N, DOT_PRECISION, DOT_UPCAST)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, svn, offs_m, offs_d, full_hi, hi, Lq, Lk, D, shift,
                   left, right, scale, s0, bh_s1, thr, drop_scale, True, HAS_LEFT, HAS_RIGHT, DROPOUT, EVEN_D,
                   BLOCK_N, DOT_PRECISION, DOT_UPCAST)
    # dQ is contiguous (B, H, Lq, D).
    _store_rows(DQ + bh.to(tl.int64) * Lq * D, offs_m, D, offs_d, Lq, D, dq * scale, EVEN_D)


_autotuned_kernels: Dict[Tuple[str, bool], triton.runtime.Autotuner] = {}


def _kernel(name: str, fp32: bool):
    """The jitted kernel, wrapped in triton.autotune when PYTRAIN_ATTENTION_AUTOTUNE=1 (never interpreted).

    Autotuning is keyed on the flags and D tile (and, implicitly, the tensors' dtypes) and on the
    power-of-two bucket of the longer sequence, so varying lengths do not retune every call.
    """
    raw = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[name]
    if not _autotune_enabled():
        return raw
    if (name, fp32) not in _autotuned_kernels:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _CONFIGS["autotune"][name]["float32" if fp32 else "16-bit"]]
        key = ["L_BUCKET", "HAS_LEFT", "HAS_RIGHT", "DROPOUT", "BLOCK_D", "EVEN_D"]
        _autotuned_kernels[(name, fp32)] = triton.autotune(configs=configs, key=key)(raw)
    return _autotuned_kernels[(name, fp32)]


def _launch(name: str, grid_rows: int, n_heads: int, args: tuple, head_dim: int, dtype: torch.dtype,
            **constexprs) -> None:
    """Launch kernel ``name`` over ``launch_grid(grid_rows, block, n_heads)``."""
    kernel = _kernel(name, dtype == torch.float32)
    rows_block = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[lambda meta: launch_grid(grid_rows, meta[rows_block], n_heads)](*args, **constexprs)
    else:
        cfg = attention_config(name, head_dim, dtype)
        kernel[launch_grid(grid_rows, cfg[rows_block], n_heads)](*args, **constexprs, **cfg)


# --------------------------------------------------------------------------------------------- launchers
class _Params(NamedTuple):
    """Kernel arguments shared by the forward and backward launches."""

    scalars: tuple  # scale, left, right, seed_lo, seed_hi, threshold, drop_scale, L_BUCKET
    constexprs: dict  # HAS_LEFT, HAS_RIGHT, DROPOUT, BLOCK_D, EVEN_D, DOT_PRECISION, DOT_UPCAST


def _params(q: Tensor, k: Tensor, scale: float, causal: bool, window_left: int, window_right: int,
            dropout_p: float, seed: int) -> _Params:
    if q.dtype not in _TL_DTYPES:
        raise TypeError(f"attention (triton): dtype {q.dtype} not supported (float32, float16, bfloat16)")
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    right = 0 if causal else window_right
    dropout = dropout_p > 0.0
    threshold = min(int(dropout_p * 2**32), MASK32) if dropout else 0
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    l_bucket = triton.next_power_of_2(max(q.shape[2], k.shape[2], 1))
    scalars = (float(scale), max(window_left, 0), max(right, 0), seed & MASK32,
               (seed >> 32) & MASK32, threshold, drop_scale, l_bucket)
    constexprs = dict(HAS_LEFT=window_left >= 0, HAS_RIGHT=right >= 0, DROPOUT=dropout, BLOCK_D=block_d,
                      EVEN_D=block_d == d, DOT_PRECISION="ieee",
                      DOT_UPCAST=_interpreted() and q.dtype == torch.bfloat16)
    return _Params(scalars, constexprs)


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
                      window_right: int, dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Flash attention forward: returns (out, lse).

    q: (batch, heads, seqlen_q, headdim); k, v: (batch, kv_heads, seqlen_k, headdim), heads % kv_heads == 0,
    one dtype (float32 / float16 / bfloat16), headdim 16..256.  scale multiplies q . k.  causal: bottom-right
    aligned causal mask (forces window_right = 0).  window_left / window_right: keys allowed left / right of
    the (shifted) diagonal, -1 for unbounded.  dropout_p in [0, 1) with the stateless mask of ``seed``.
    out: like q; lse: (batch, heads, seqlen_q) float32, -inf for rows that allow no key (their out is 0).
    """
    q, k, v = _contiguous(q), _contiguous(k), _contiguous(v)
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    prm = _params(q, k, scale, causal, window_left, window_right, dropout_p, seed)
    args = (q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], h, h // hkv, lq,
            lk, d, *prm.scalars)
    _launch("fwd", lq, b * h, args, d, q.dtype, **prm.constexprs)
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool, window_left: int, window_right: int, dropout_p: float,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Flash attention backward: (dq, dk, dv) shaped and typed like (q, k, v).

    grad_out, out: like q; lse: the forward's (batch, heads, seqlen_q) float32; other arguments as in
    ``attention_forward``.  GQA: dk, dv of a kv head sum its query heads' contributions (deterministically).
    """
    q, k, v, out = _contiguous(q), _contiguous(k), _contiguous(v), _contiguous(out)
    grad_out = _contiguous(grad_out.to(q.dtype))
    lse = _contiguous(lse.to(torch.float32))
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    prm = _params(q, k, scale, causal, window_left, window_right, dropout_p, seed)
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    tail = (lq, lk, d, *prm.scalars)
    _attn_bwd_preprocess_kernel[launch_grid(lq, PREPROCESS_BLOCK_M, b * h)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], h, lq, d, BLOCK_M=PREPROCESS_BLOCK_M,
        BLOCK_D=prm.constexprs["BLOCK_D"], num_warps=4)
    _launch("dkdv", lk, b * hkv, (q, k, v, grad_out, lse, delta, dk, dv, *strides, h, hkv, h // hkv, *tail), d,
            q.dtype, **prm.constexprs)
    _launch("dq", lq, b * h, (q, k, v, grad_out, lse, delta, dq, *strides, h, h // hkv, *tail), d, q.dtype,
            **prm.constexprs)
    return dq, dk, dv
