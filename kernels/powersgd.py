"""Triton PowerSGD kernels, float32, batched over same-shape matrices (reference: pytrain/ops/powersgd.py):

* ``powersgd_p(M, Q)``: P = M Q; one program per (BLOCK_ROWS rows, matrix), looping over M's columns.
* ``powersgd_q(M, P)``: Q = M^T P; one program per (BLOCK_ROWS columns, matrix), looping over M's rows.
  Both run ``_product_kernel``, which reads M or M^T through strides.
* ``orthogonalize(P, eps)``: Gram-Schmidt on P's columns in place, robust to rank deficiency (the contract in
  pytrain/ops/powersgd.py), one program per matrix: a pass for the input's largest column norm s; per column i,
  twice a pass for the dot products of column i with the finished columns and a pass writing v -= U (U^T v);
  when |v| <= eps * s or the second projection halved it (s finite), a pass for the row j of least |U[j, :]|^2, one writing e_j, and the two
  projections again; then a pass writing v / |v|.  Every pass that writes P ends with ``tl.debug_barrier()``:
  the next pass reads what other threads of the program wrote.  Sums in float32 (the CPU and CUDA kernels
  sum in double): a column norm above ~1.8e19 overflows here.

M (b, n, m) or (n, m); Q (b, m, r); P (b, n, r).  The rank r is padded to R_PAD = max(16, next power of two) columns
(masked) so the products are ``tl.dot`` tiles, in IEEE float32 (no TF32).  Both products read M once.
Offsets: int64 for a tile's position (a matrix or a batch may hold more than 2^31 elements), int32 inside a tile
(n, m < 2^31 / 64, checked).  Spills (bench/results/aot-sm90.md): ptxas spills one 4 B register in one or two of
the nine compiled variants, and which ones moves with equivalent rewrites of the same code (pointer increments,
int32 masks, a vector argmin); left as is: one spilled word per thread, in L1, next to a 64 x 64 tile loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS, BLOCK_K = 64, 64


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@triton.jit
def _product_kernel(m_ptr, f_ptr, out_ptr, n, m, r, out_len, k_len, stride_out, stride_k, BLOCK_OUT: tl.constexpr,
                    BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """out[mat, o, c] = sum_k A[o, k] F[mat, k, c] with A[o, k] = M[mat].flat[o * stride_out + k * stride_k]:
    P = M Q (A = M: stride_out m, stride_k 1) or Q = M^T P (A = M^T: stride_out 1, stride_k m)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_OUT
    local = tl.arange(0, BLOCK_OUT)
    outs = first + local
    mat = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, R_PAD)
    # int64 scalar offsets of the tile; int32 offsets inside it (< BLOCK * max(n, m) < 2^31, see the launcher)
    a_base = m_ptr + mat * n * m + first * stride_out
    f_base = f_ptr + mat * k_len * r
    wide = tl.full((), 1, tl.int64)  # k0 * wide * stride: the tile's start in int64
    acc = tl.zeros((BLOCK_OUT, R_PAD), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = tl.arange(0, BLOCK_K)
        a = tl.load(a_base + k0 * wide * stride_k + local[:, None] * stride_out + ks[None, :] * stride_k,
                    mask=(outs[:, None] < out_len) & (ks[None, :] < k_len - k0), other=0.0)
        f = tl.load(f_base + k0 * wide * r + ks[:, None] * r + cols[None, :],
                    mask=(ks[:, None] < k_len - k0) & (cols[None, :] < r), other=0.0)
        acc += tl.dot(a, f, input_precision="ieee")
    tl.store(out_ptr + mat * out_len * r + outs[:, None] * r + cols[None, :], acc,
             mask=(outs[:, None] < out_len) & (cols[None, :] < r))


@triton.jit
def _column(tile, cols, i):
    """Column i of a (rows, R_PAD) tile, as a (rows,) vector."""
    return tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _tile(base, n, r, r0, cols, BLOCK_N: tl.constexpr):
    """Rows [r0, r0 + BLOCK_N) of one matrix (n, r), padded with zeros: (offsets, mask, tile)."""
    rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
    offs = rows[:, None] * r + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < r)
    return offs, mask, tl.load(base + offs, mask=mask, other=0.0)


@triton.jit
def _project_out_twice(base, n, r, i, cols, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """Column i -= U (U^T column i), twice, U = columns [0, i); returns its squared norm after each pass."""
    first = 0.0
    sq = 0.0
    for _pass in tl.static_range(2):
        first = sq
        dots = tl.zeros((R_PAD,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_N):
            _, _, tile = _tile(base, n, r, r0, cols, BLOCK_N)
            dots += tl.sum(tile * _column(tile, cols, i)[:, None], axis=0)
        dots = tl.where(cols < i, dots, 0.0)
        sq = 0.0
        for r0 in range(0, n, BLOCK_N):
            offs, mask, tile = _tile(base, n, r, r0, cols, BLOCK_N)
            v = _column(tile, cols, i) - tl.sum(tile * dots[None, :], axis=1)
            sq += tl.sum(v * v, axis=0)
            tl.store(base + offs, v[:, None] + tl.zeros_like(tile), mask=mask & (cols[None, :] == i))
        tl.debug_barrier()  # column i written before anyone reads it
    return first, sq


@triton.jit
def _orthogonalize_kernel(p_ptr, n, r, eps, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    base = p_ptr + tl.program_id(0).to(tl.int64) * n * r
    cols = tl.arange(0, R_PAD)
    col_sq = tl.zeros((R_PAD,), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_N):
        _, _, tile = _tile(base, n, r, r0, cols, BLOCK_N)
        col_sq += tl.sum(tile * tile, axis=0)
    scale = tl.sqrt(tl.max(col_sq, axis=0))
    finite = tl.sum(tl.where((col_sq == col_sq) & (col_sq < float("inf")), 0, 1), axis=0) == 0
    limit = tl.where(finite, eps * scale, -1.0)  # nothing is replaced in a non-finite matrix
    for i in range(0, r):
        first, sq = _project_out_twice(base, n, r, i, cols, BLOCK_N, R_PAD)
        # dependent (|v| <= eps s, or halved by the second pass): e_j, j the first row of least |U[j, :]|^2
        if (limit >= 0) & ((tl.sqrt(sq) <= limit) | (sq < 0.25 * first)):
            best = tl.full((BLOCK_N,), float("inf"), tl.float32)  # per lane: least squared row norm, its row
            best_rows = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for r0 in range(0, n, BLOCK_N):
                rows = r0 + tl.arange(0, BLOCK_N)
                _, _, tile = _tile(base, n, r, r0, cols, BLOCK_N)
                row_sq = tl.where(rows < n, tl.sum(tl.where(cols[None, :] < i, tile * tile, 0.0), axis=1),
                                  float("inf"))
                best_rows = tl.where(row_sq < best, rows, best_rows)  # strict: a lane keeps its first row
                best = tl.minimum(row_sq, best)
            least = tl.min(best, axis=0)
            best_row = tl.min(tl.where(best == least, best_rows, n), axis=0)  # the first row of least norm
            for r0 in range(0, n, BLOCK_N):
                rows = r0 + tl.arange(0, BLOCK_N)
                offs, mask, tile = _tile(base, n, r, r0, cols, BLOCK_N)
                unit = tl.where(rows == best_row, 1.0, 0.0)
                tl.store(base + offs, unit[:, None] + tl.zeros_like(tile), mask=mask & (cols[None, :] == i))
            tl.debug_barrier()
            first, sq = _project_out_twice(base, n, r, i, cols, BLOCK_N, R_PAD)
        norm = tl.sqrt(sq)
        for r0 in range(0, n, BLOCK_N):
            offs, mask, tile = _tile(base, n, r, r0, cols, BLOCK_N)
            tl.store(base + offs, tile / norm, mask=mask & (cols[None, :] == i))
        tl.debug_barrier()  # column i final before the next column's passes read it


def _batched(t: Tensor) -> Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _skinny_product(M: Tensor, F: Tensor, transpose: bool) -> Tensor:
    """M Q (transpose False; F = Q) or M^T P (transpose True; F = P), batched, 2-D for 2-D inputs."""
    M3, F3 = _batched(M), _batched(F)
    b, n, m = M3.shape
    r = F3.shape[2]
    out_len, k_len, stride_out, stride_k = (m, n, 1, m) if transpose else (n, m, m, 1)
    if max(n, m) * max(BLOCK_ROWS, BLOCK_K) >= 2**31:
        raise ValueError(f"powersgd: a {n} x {m} matrix is too wide for the Triton kernel's int32 tile offsets "
                         f"(n and m < {2**31 // max(BLOCK_ROWS, BLOCK_K)}); use impl='cuda'")
    out = torch.empty((b, out_len, r), dtype=M.dtype, device=M.device)
    _product_kernel[(triton.cdiv(out_len, BLOCK_ROWS), b)](M3, F3, out, n, m, r, out_len, k_len, stride_out, stride_k,
                                                           BLOCK_OUT=BLOCK_ROWS, BLOCK_K=BLOCK_K, R_PAD=_r_pad(r))
    return out if M.dim() == 3 else out.squeeze(0)


def powersgd_p(M: Tensor, Q: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), Q (b, m, r) or (m, r) -> P = M Q (b, n, r) or (n, r); float32, contiguous."""
    return _skinny_product(M, Q, transpose=False)


def powersgd_q(M: Tensor, P: Tensor) -> Tensor:
    """M (b, n, m) or (n, m), P (b, n, r) or (n, r) -> Q = M^T P (b, m, r) or (m, r); float32, contiguous."""
    return _skinny_product(M, P, transpose=True)


def orthogonalize(P: Tensor, eps: float) -> None:
    """Gram-Schmidt on the columns of P (b, n, r) or (n, r), in place, robust to rank deficiency; float32, contiguous."""
    P3 = _batched(P)
    b, n, r = P3.shape
    _orthogonalize_kernel[(b,)](P3, n, r, eps, BLOCK_N=BLOCK_ROWS, R_PAD=_r_pad(r))
