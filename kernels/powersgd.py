"""Triton PowerSGD kernels, float32, batched over same-shape matrices (reference: pytrain/ops/powersgd.py):

* ``powersgd_p(M, Q)``: P = M Q; one program per (BLOCK_ROWS rows, matrix), looping over M's columns.
* ``powersgd_q(M, P)``: Q = M^T P; one program per (BLOCK_ROWS columns, matrix), looping over M's rows.
  Both run ``_product_kernel``, which reads M or M^T through strides.
* ``orthogonalize(P, eps)``: modified Gram-Schmidt on P's columns in place, one program per matrix:
  per column i, one pass for the dot products of column i with every column, one to normalise
  (p_i /= |p_i| + eps) and subtract (p_j -= (p_i . p_j) p_i for j > i).

M (b, n, m) or (n, m); Q (b, m, r); P (b, n, r).  The rank r is padded to R_PAD = max(16, next power of two) columns
(masked) so the products are ``tl.dot`` tiles, in IEEE float32 (no TF32).  Both products read M once.
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
    outs = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mat = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_OUT, R_PAD), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(m_ptr + mat * n * m + outs[:, None] * stride_out + ks[None, :] * stride_k,
                    mask=(outs[:, None] < out_len) & (ks[None, :] < k_len), other=0.0)
        f = tl.load(f_ptr + mat * k_len * r + ks[:, None] * r + cols[None, :],
                    mask=(ks[:, None] < k_len) & (cols[None, :] < r), other=0.0)
        acc += tl.dot(a, f, input_precision="ieee")
    tl.store(out_ptr + mat * out_len * r + outs[:, None] * r + cols[None, :], acc,
             mask=(outs[:, None] < out_len) & (cols[None, :] < r))


@triton.jit
def _column(tile, cols, i):
    """Column i of a (rows, R_PAD) tile, as a (rows,) vector."""
    return tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _orthogonalize_kernel(p_ptr, n, r, eps, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    base = p_ptr + tl.program_id(0).to(tl.int64) * n * r
    cols = tl.arange(0, R_PAD)
    for i in range(0, r):
        dots = tl.zeros((R_PAD,), dtype=tl.float32)
        for r0 in range(0, n, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            mask = (rows[:, None] < n) & (cols[None, :] < r)
            tile = tl.load(base + rows[:, None] * r + cols[None, :], mask=mask, other=0.0)
            dots += tl.sum(tile * _column(tile, cols, i)[:, None], axis=0)
        inv = 1.0 / (tl.sqrt(tl.sum(tl.where(cols == i, dots, 0.0), axis=0)) + eps)
        coef = tl.where(cols > i, dots * inv, 0.0)  # (p_i / |p_i|) . p_j for the later columns
        for r0 in range(0, n, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            mask = (rows[:, None] < n) & (cols[None, :] < r)
            tile = tl.load(base + rows[:, None] * r + cols[None, :], mask=mask, other=0.0)
            unit = _column(tile, cols, i) * inv
            tile = tl.where(cols[None, :] == i, unit[:, None], tile - coef[None, :] * unit[:, None])
            tl.store(base + rows[:, None] * r + cols[None, :], tile, mask=mask)


def _batched(t: Tensor) -> Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _skinny_product(M: Tensor, F: Tensor, transpose: bool) -> Tensor:
    """M Q (transpose False; F = Q) or M^T P (transpose True; F = P), batched, 2-D for 2-D inputs."""
    M3, F3 = _batched(M), _batched(F)
    b, n, m = M3.shape
    r = F3.shape[2]
    out_len, k_len, stride_out, stride_k = (m, n, 1, m) if transpose else (n, m, m, 1)
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
    """Gram-Schmidt on the columns of P (b, n, r) or (n, r), in place; float32, contiguous."""
    P3 = _batched(P)
    b, n, r = P3.shape
    _orthogonalize_kernel[(b,)](P3, n, r, eps, BLOCK_N=BLOCK_ROWS, R_PAD=_r_pad(r))
