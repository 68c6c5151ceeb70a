"""Triton fused linear cross-entropy: torch matmuls per chunk of tokens around one fused row kernel.

Contract and maths: ``pytrain/ops/linear_cross_entropy.py``.  As in Liger-Kernel's fused linear cross-entropy,
the GEMMs stay with cuBLAS (``torch.mm``): per chunk of ``chunk`` rows the launcher forms the logits chunk
x = hidden[chunk] @ weight^T, widened to float32, and ``_row_kernel`` (one program per token) makes two passes
over its row in blocks of ``BLOCK`` columns:

1. add the bias, apply the softcap (written back), and keep an online log-sum-exp (running max m and
   sum s of exp(z - m), rescaled by exp(m_old - m_new) when the max grows) and the sum of z;
2. with gradients, overwrite the row with dx = g (p (1 + 2 z_loss lse) - eps / V - (1 - eps)[j == t]) tanh'.

A target outside [0, V) that is not ignore_index gives a NaN loss and gradient row (the public function checks
targets on the host first, except under torch.compile).  Then grad_hidden[chunk] = dx @ weight and
grad_weight += dx^T @ hidden[chunk] (``kernels/linear_chunks.py``, shared with ``linear_distillation_loss``:
torch, dx rounded to the inputs' dtype, grad_weight accumulated in float32), grad_bias += column sums of dx.
Memory O(chunk x V + V x H).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .linear_chunks import skip_row, walk_linear_chunks

ROW_CONFIG = {"BLOCK": 4096, "num_warps": 8}


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): +-1 at the extremes (e^{2x} = inf or 0), no NaN for finite x
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _row_kernel(x_ptr, V, bias_ptr, target_ptr, scale_ptr, loss_ptr, ignore_index, eps, z_loss, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(target_ptr + row)
    x_row = x_ptr + row.to(tl.int64) * V
    if skip_row(x_row, loss_ptr + row, t, V, ignore_index, GRAD, BLOCK) == 0:  # else ignored or a bad target
        m = -float("inf")
        s = 0.0
        sum_z = 0.0
        zt = 0.0  # z[t], taken in this pass: pass 2's stores may overwrite it while another warp would reload it
        for j in range(0, V, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            mask = offs < V
            z = tl.load(x_row + offs, mask=mask, other=0.0)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _tanh(z / softcap)
            tl.store(x_row + offs, z, mask=mask)
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
            zt += tl.sum(tl.where(offs == t, z, 0.0), axis=0)
            zm = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(zm, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        loss = lse - (1.0 - eps) * zt - eps / V * sum_z + z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        if GRAD:
            g = tl.load(scale_ptr + row)
            a = g * (1.0 + 2.0 * z_loss * lse)
            b = g * eps / V
            for j in range(0, V, BLOCK):
                offs = j + tl.arange(0, BLOCK)
                mask = offs < V
                z = tl.load(x_row + offs, mask=mask, other=0.0)
                d = a * tl.exp(z - lse) - b
                d = tl.where(offs == t, d - g * (1.0 - eps), d)
                if SOFTCAP:
                    r = z / softcap
                    d = d * (1.0 - r * r)
                tl.store(x_row + offs, d, mask=mask)


def row_pass(x: Tensor, bias: Optional[Tensor], target: Tensor, scale: Optional[Tensor], losses: Tensor,
             ignore_index: int, eps: float, z_loss: float, softcap: float) -> None:
    """Losses of the (c, V) float32 logits chunk x into ``losses`` (c,); with ``scale`` x becomes dx."""
    c, vocab = x.shape
    if c == 0:
        return
    block = min(ROW_CONFIG["BLOCK"], triton.next_power_of_2(vocab))
    dummy = losses
    _row_kernel[(c,)](x, vocab, bias if bias is not None else dummy, target, scale if scale is not None else dummy,
                      losses, ignore_index, eps, z_loss, softcap if softcap > 0 else 1.0,
                      HAS_BIAS=bias is not None, SOFTCAP=softcap > 0, GRAD=scale is not None, BLOCK=block,
                      num_warps=ROW_CONFIG["num_warps"])


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                         grad_scale: Optional[Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
                         softcap: float, chunk: int):
    """The op ``pytrain::linear_cross_entropy_triton``: (losses, grad_hidden, grad_weight, grad_bias)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    grad = grad_scale is not None
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    gb_acc = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if grad and bias is not None else None
    target = target.contiguous()

    def rows(r0: int, x: Tensor) -> None:
        c = x.shape[0]
        row_pass(x, bias, target[r0:r0 + c], None if not grad else grad_scale[r0:r0 + c], losses[r0:r0 + c],
                 ignore_index, label_smoothing, z_loss, softcap)
        if gb_acc is not None:
            gb_acc.add_(x.sum(0))

    grad_hidden, gw_acc = walk_linear_chunks(hidden, weight, chunk, grad, rows)
    if not grad:
        return losses, grad_hidden, weight.new_empty(0), hidden.new_empty(0)
    grad_bias = gb_acc.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return losses, grad_hidden, gw_acc.to(weight.dtype), grad_bias
