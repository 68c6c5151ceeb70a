"""Triton fused linear distillation loss: torch matmuls per chunk of tokens around one fused row kernel.

Contract and maths (with references): ``pytrain/ops/linear_distillation_loss.py``.  The chunk walk is
``kernels/linear_chunks.py``'s (shared with ``linear_cross_entropy``: the student's logits chunk and, after the row
kernel, the gradient GEMMs, all torch.mm); inside it each chunk also gets the teacher's logits (torch.mm, float32), and
``_row_kernel`` (one program per token) makes three passes over its two rows in blocks of ``BLOCK`` columns:

1. online log-sum-exps of s / T and t / T (and of s for the hard labels): running max m and sum of exp(z - m),
   rescaled by exp(m_old - m_new) when the max grows;
2. the divergence D, storing into the teacher's row p ("kl") or r = log q - log p ("reverse_kl") or
   r = log q - log m ("jsd");
3. with gradients, the student's row becomes dloss/ds = g ((1 - a) T dD/du + a (softmax(s) - onehot)).

A target outside [0, V) that is not ignore_index gives a NaN loss and gradient row (the public function checks
targets on the host first, except under torch.compile).  Memory O(chunk x V + V x Hs).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .linear_chunks import skip_row, walk_linear_chunks

ROW_CONFIG = {"BLOCK": 2048, "num_warps": 8}
KIND_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _online(m, s, z):
    """(max, sum of exp(. - max)) after the masked block z (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)


@triton.jit
def _row_kernel(s_ptr, t_ptr, V, target_ptr, scale_ptr, loss_ptr, ignore_index, inv_t, temperature, beta, hard,
                KIND: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr, GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    s_row = s_ptr + row.to(tl.int64) * V
    t_row = t_ptr + row.to(tl.int64) * V
    tgt = 0
    skipped = 0
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        skipped = skip_row(s_row, loss_ptr + row, tgt, V, ignore_index, GRAD, BLOCK)  # ignored or a bad target
    if skipped == 0:
        mu = -float("inf")
        su = 0.0
        mv = -float("inf")
        sv = 0.0
        ms = -float("inf")
        ss = 0.0
        st = 0.0  # s[target], taken in this pass: pass 3's stores may overwrite it while another warp reloads it
        for j in range(0, V, BLOCK):  # 1: log-sum-exps
            offs = j + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(s_row + offs, mask=mask, other=-float("inf"))
            y = tl.load(t_row + offs, mask=mask, other=-float("inf"))
            mu, su = _online(mu, su, x * inv_t)
            mv, sv = _online(mv, sv, y * inv_t)
            if HARD:
                ms, ss = _online(ms, ss, x)
                st += tl.sum(tl.where(offs == tgt, x, 0.0), axis=0)
        lse_u = mu + tl.log(su)
        lse_v = mv + tl.log(sv)
        lse_s = 0.0
        if HARD:
            lse_s = ms + tl.log(ss)
        lb = tl.log(beta)
        l1b = tl.log(1.0 - beta)
        div = 0.0
        center = 0.0
        for j in range(0, V, BLOCK):  # 2: the divergence; the teacher's row becomes p or r
            offs = j + tl.arange(0, BLOCK)
            mask = offs < V
            lq = tl.load(s_row + offs, mask=mask, other=0.0) * inv_t - lse_u
            lp = tl.load(t_row + offs, mask=mask, other=0.0) * inv_t - lse_v
            q = tl.exp(lq)
            p = tl.exp(lp)
            if KIND == 0:
                keep = p
                d = p * (lp - lq)
            elif KIND == 1:
                keep = lq - lp
                d = q * keep
            else:
                a = lp + lb
                b = lq + l1b
                hi = tl.maximum(a, b)
                lm = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
                keep = lq - lm
                d = beta * p * (lp - lm) + (1.0 - beta) * q * keep
                center += tl.sum(tl.where(mask, q * keep, 0.0), axis=0)
            div += tl.sum(tl.where(mask, d, 0.0), axis=0)
            tl.store(t_row + offs, keep, mask=mask)
        loss = (1.0 - hard) * temperature * temperature * div
        if HARD:
            loss += hard * (lse_s - st)
        tl.store(loss_ptr + row, loss)
        if GRAD:
            g = tl.load(scale_ptr + row)
            soft = g * (1.0 - hard) * temperature
            if KIND == 2:
                soft = soft * (1.0 - beta)
            else:
                center = div
            for j in range(0, V, BLOCK):  # 3: dloss/ds
                offs = j + tl.arange(0, BLOCK)
                mask = offs < V
                x = tl.load(s_row + offs, mask=mask, other=0.0)
                kept = tl.load(t_row + offs, mask=mask, other=0.0)
                q = tl.exp(x * inv_t - lse_u)
                if KIND == 0:
                    d = soft * (q - kept)
                else:
                    d = soft * q * (kept - center)
                if HARD:
                    d += g * hard * (tl.exp(x - lse_s) - tl.where(offs == tgt, 1.0, 0.0))
                tl.store(s_row + offs, d, mask=mask)


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor], grad_scale: Optional[Tensor], kind: str,
                             temperature: float, beta: float, hard_label_weight: float, ignore_index: int,
                             chunk: int):
    """The op ``pytrain::linear_distillation_loss_triton``: (losses, grad_hidden, grad_weight)."""
    if kind not in KIND_CODES:
        raise ValueError(f"linear_distillation_loss: kind must be one of {tuple(KIND_CODES)}, got {kind!r}")
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    grad = grad_scale is not None
    losses = torch.empty(n, dtype=torch.float32, device=student_hidden.device)
    block = min(ROW_CONFIG["BLOCK"], triton.next_power_of_2(vocab))

    def rows(r0: int, x: Tensor) -> None:
        c = x.shape[0]
        if c == 0:
            return
        y = torch.mm(teacher_hidden[r0:r0 + c], teacher_weight.t()).float()
        _row_kernel[(c,)](x, y, vocab, target[r0:r0 + c] if target is not None else losses,
                          grad_scale[r0:r0 + c] if grad else losses, losses[r0:r0 + c], ignore_index,
                          1.0 / temperature, temperature, beta if kind == "jsd" else 0.5, hard_label_weight,
                          KIND=KIND_CODES[kind], HAS_TARGET=target is not None, HARD=hard_label_weight > 0,
                          GRAD=grad, BLOCK=block, num_warps=ROW_CONFIG["num_warps"])

    grad_hidden, gw_acc = walk_linear_chunks(student_hidden, student_weight, chunk, grad, rows)
    if not grad:
        return losses, grad_hidden, student_weight.new_empty(0)
    return losses, grad_hidden, gw_acc.to(student_weight.dtype)
