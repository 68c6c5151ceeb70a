"""Fused linear distillation loss: a student's language-model head distilled from a teacher's, without either (N, V)
logit matrix.

Op (namespace ``pytrain``):

* ``linear_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target?, grad_scale?,
  kind, temperature, beta, hard_label_weight, ignore_index, chunk) -> (losses, grad_hidden, grad_weight)``

Shapes: student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht), teacher_weight (V, Ht) (one float
dtype), target (N,) int64 or None, grad_scale (N,) float32 or None.  Per token i (T = temperature,
a = hard_label_weight, b = beta):

    s = student_hidden[i] @ student_weight^T,   t = teacher_hidden[i] @ teacher_weight^T        (V,)
    log q = log_softmax(s / T)  (student),      log p = log_softmax(t / T)  (teacher)
    D = KL(p || q) = sum_j p_j (log p_j - log q_j)                         kind "kl" (forward KL)
    D = KL(q || p) = sum_j q_j (log q_j - log p_j)                         kind "reverse_kl"
    D = b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q            kind "jsd" (0 < b < 1)
    loss[i] = (1 - a) T^2 D  +  a CE(s, target[i])                        (CE at temperature 1)

The T^2 factor keeps the soft targets' gradients on the scale of the hard ones as T changes (Hinton, Vinyals and
Dean, "Distilling the Knowledge in a Neural Network", 2015).  The generalised Jensen-Shannon divergence with
mixing weight b is that of Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes" (ICLR 2024, GKD) and of Liger-Kernel's fused linear JSD (p the teacher, q the student):
it tends to b KL(p || q) as b -> 0 and (1 - b) KL(q || p) as b -> 1, so those ends are the kinds "kl" and
"reverse_kl".  The gradient for the student's logits, with u = s / T (all kinds reduce to
dD/du_k = q_k (r_k - sum_j q_j r_j) for some r):

    "kl":          dD/du = q - p
    "reverse_kl":  dD/du_k = q_k (r_k - D),  r = log q - log p
    "jsd":         dD/du_k = (1 - b) q_k (r_k - sum_j q_j r_j),  r = log q - log m
    dloss/ds = g[i] ((1 - a) T dD/du + a (softmax(s) - onehot(target[i])))

Tokens whose target is ``ignore_index`` have loss 0 and no gradient (distillation included: prompts and padding
are neither distilled nor predicted); without a target every token counts and a must be 0.  The teacher is a
constant: no gradient flows to its hidden states or weight.  g = grad_scale: when given, the op also returns

    grad_hidden = ds @ student_weight       (N, Hs), the inputs' dtype
    grad_weight = ds^T @ student_hidden     (V, Hs), the inputs' dtype (accumulated over chunks in float32)

and empty tensors otherwise.  losses: (N,) float32 (float64 for float64 inputs).

Every backend walks the tokens in chunks of ``chunk`` rows, the chunk walk of ``linear_cross_entropy`` (CPU and
CUDA C++: ``csrc/linear_chunks.h``; Triton: ``kernels/linear_chunks.py``): the student's and
the teacher's logits of one chunk come from torch's GEMM, one fused pass per row turns the student's into
dloss/ds and the losses, and two more GEMMs give that chunk's grad_hidden rows and its share of grad_weight.
Peak extra memory O(chunk x V) for the two logit chunks plus O(N x Hs + V x Hs) for the gradients, never
O(N x V).  As ``linear_cross_entropy``, the public function computes the gradients in the forward pass for the
reductions "mean" / "sum" and recomputes them in backward with the per-token upstream gradients for "none".

Backends: ``csrc/cpu/linear_distillation_loss.cpp`` (CPU: a SIMD + OpenMP row pass),
``csrc/cuda/linear_distillation_loss.cu`` (CUDA C++: one block per token row), ``kernels/linear_distillation_loss.py``
(Triton: one program per token row), all float32 / bfloat16 / float16 with float32 accumulation.  The reference
below is their contract (and serves float64).  A target outside [0, V) that is not ignore_index is an error on the
CPU and a NaN loss and gradient row on the GPU backends; the public function checks targets first, except under
torch.compile.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import define_op
from .linear_cross_entropy import REDUCTIONS, acc_dtype, autocast_like_linear, check_targets, default_chunk, \
    real_option, reduction_scale
from .registry import FLOAT_DTYPES, registry

OP = "linear_distillation_loss"
SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
          "Tensor? target, Tensor? grad_scale, str kind, float temperature, float beta, float hard_label_weight, "
          "int ignore_index, int chunk) -> (Tensor, Tensor, Tensor)")
KINDS = ("kl", "reverse_kl", "jsd")


# ------------------------------------------------------------------------------------------ reference


def _log_probs(s: Tensor, t: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)


def _log_mixture(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    """log(b p + (1 - b) q) from log p and log q."""
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def token_losses_reference(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor], kind: str,
                           temperature: float, beta: float, hard_label_weight: float, ignore_index: int) -> Tensor:
    """Per-token losses (N,) of materialised logits (N, V) as the module docstring defines them, from torch's own
    ``F.kl_div`` and ``F.cross_entropy`` (differentiable: tests take autograd of it)."""
    lq, lp = _log_probs(student_logits, teacher_logits, temperature)

    def kl(log_a, log_b):  # KL(a || b)
        return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)

    if kind == "kl":
        d = kl(lp, lq)
    elif kind == "reverse_kl":
        d = kl(lq, lp)
    else:
        lm = _log_mixture(lp, lq, beta)
        d = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    losses = (1 - hard_label_weight) * temperature ** 2 * d
    if target is None:
        return losses
    if hard_label_weight:
        losses = losses + hard_label_weight * F.cross_entropy(student_logits, target, ignore_index=ignore_index,
                                                              reduction="none")
    return torch.where(target != ignore_index, losses, torch.zeros_like(losses))


def linear_distillation_loss_reference(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                                       teacher_weight: Tensor, target: Optional[Tensor], grad_scale: Optional[Tensor],
                                       kind: str, temperature: float, beta: float, hard_label_weight: float,
                                       ignore_index: int, chunk: int):
    """Materialised in float32 (float64 for float64 inputs), gradients by the formulas of the module docstring
    (tests check them against autograd of ``token_losses_reference``).  ``chunk`` is ignored."""
    vocab = student_weight.shape[0]
    if target is not None:
        check_targets(target, vocab, ignore_index, OP)
    acc = acc_dtype(student_hidden.dtype)
    h, w = student_hidden.to(acc), student_weight.to(acc)
    s = h @ w.t()
    t = teacher_hidden.to(acc) @ teacher_weight.to(acc).t()
    losses = token_losses_reference(s, t, target, kind, temperature, beta, hard_label_weight, ignore_index)
    if grad_scale is None:
        return losses, student_hidden.new_empty(0), student_weight.new_empty(0)
    lq, lp = _log_probs(s, t, temperature)
    q = lq.exp()
    if kind == "kl":
        du = q - lp.exp()
    else:
        r = lq - lp if kind == "reverse_kl" else lq - _log_mixture(lp, lq, beta)
        du = (1 - beta if kind == "jsd" else 1.0) * q * (r - (q * r).sum(-1, keepdim=True))
    ds = (1 - hard_label_weight) * temperature * du
    g = grad_scale.to(acc)
    if target is not None:
        keep = target != ignore_index
        if hard_label_weight:
            onehot = F.one_hot(torch.where(keep, target, 0), vocab).to(acc)
            ds = ds + hard_label_weight * (torch.softmax(s, -1) - onehot)
        g = torch.where(keep, g, 0.0)  # ignored rows: 0 even for a NaN scale
    ds = ds * g[:, None]
    return losses, (ds @ w).to(student_hidden.dtype), (ds.t() @ h).to(student_weight.dtype)


# ------------------------------------------------------------------------------------------ input rules


def unsupported(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor]) -> List[str]:
    """Why the fused op cannot take these inputs (empty when it can)."""
    named = (("student_hidden", student_hidden), ("student_weight", student_weight),
             ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight), ("target", target))
    for name, x in named:
        if x is not None and not isinstance(x, Tensor):
            return [f"{name} must be a Tensor, got {type(x).__name__}"]
    out = []
    for side, hid, wt in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if hid.dim() != 2 or wt.dim() != 2:
            out.append(f"{side}_hidden must be (N, H) and {side}_weight (V, H), got {tuple(hid.shape)} and "
                       f"{tuple(wt.shape)}")
        elif hid.shape[1] != wt.shape[1]:
            out.append(f"{side}_hidden (N, H) = {tuple(hid.shape)} and {side}_weight (V, H) = {tuple(wt.shape)} "
                       f"differ in H")
    if out:
        return out
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if teacher_hidden.shape[0] != n:
        out.append(f"student_hidden has N = {n} rows and teacher_hidden {teacher_hidden.shape[0]}; they must match")
    if teacher_weight.shape[0] != vocab:
        out.append(f"student_weight has V = {vocab} rows and teacher_weight {teacher_weight.shape[0]}: student and "
                   f"teacher must share a vocabulary")
    elif vocab == 0:
        out.append("the weights have V = 0 rows: no class to predict")
    if target is not None:
        if target.dim() != 1 or target.shape[0] != n:
            out.append(f"target must be (N,) = ({n},), got {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32):
            out.append(f"target must be int64 (or int32), got {target.dtype}")
    if student_hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        out.append(f"student_hidden has dtype {student_hidden.dtype}; supported: float32, bfloat16, float16, float64")
    dtypes = [x.dtype for _, x in named[:4]]
    if len(set(dtypes)) > 1:
        out.append(f"student_hidden, student_weight, teacher_hidden and teacher_weight must share a dtype, got "
                   f"{', '.join(map(str, dtypes))}")
    devices = {x.device for _, x in named if x is not None}
    if len(devices) > 1:
        out.append(f"every tensor must be on one device, got {sorted(map(str, devices))}")
    return out


def check_options(kind: str, temperature: float, beta: float, hard_label_weight: float, ignore_index: int,
                  reduction: str, has_target: bool) -> Tuple[float, float, float]:
    """Validated (temperature, beta, hard_label_weight)."""
    if kind not in KINDS:
        raise ValueError(f"{OP}: kind must be one of {KINDS}, got {kind!r}")
    temp = real_option(OP, "temperature", temperature)
    if temp <= 0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temp}")
    b = real_option(OP, "beta", beta)
    if kind == "jsd" and not 0.0 < b < 1.0:
        raise ValueError(f"{OP}: beta must be in (0, 1) for kind 'jsd' (its ends are kinds 'kl' and 'reverse_kl'), "
                         f"got {b}")
    a = real_option(OP, "hard_label_weight", hard_label_weight)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"{OP}: hard_label_weight must be in [0, 1], got {a}")
    if a > 0 and not has_target:
        raise ValueError(f"{OP}: hard_label_weight = {a} needs a target (the hard labels), got target=None")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return temp, b, a


# ------------------------------------------------------------------------------------------ op


def _fake(student_hidden, student_weight, teacher_hidden, teacher_weight, target, grad_scale, kind, temperature,
          beta, hard_label_weight, ignore_index, chunk):
    torch._check(student_hidden.dim() == 2 and student_weight.dim() == 2
                 and student_hidden.shape[1] == student_weight.shape[1],
                 lambda: f"{OP}: student_hidden {tuple(student_hidden.shape)}, student_weight "
                         f"{tuple(student_weight.shape)}")
    losses = student_hidden.new_empty(student_hidden.shape[:1], dtype=acc_dtype(student_hidden.dtype))
    if grad_scale is None:
        return losses, student_hidden.new_empty(0), student_weight.new_empty(0)
    return losses, torch.empty_like(student_hidden), torch.empty_like(student_weight)


def _triton(*args):
    from ..kernels.linear_distillation_loss import linear_distillation_loss as launch
    return launch(*args)


define_op(OP, SCHEMA, reference=linear_distillation_loss_reference, fake=_fake, triton=_triton)


# ------------------------------------------------------------------------------------------ autograd
# As linear_cross_entropy's: "mean" / "sum" get their gradients in the forward pass (backward scales them); "none"
# reruns the chunked pass in backward with the per-token upstream gradients.  The teacher gets no gradient.


class _LinearDistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, target, scale, divisor,
                options, impl):
        op = registry(OP).select(student_hidden.device, student_hidden.dtype, impl).fn
        wants_grad = any(ctx.needs_input_grad[:2])
        ctx.options, ctx.impl = options, impl
        inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, target)
        if scale is None:  # reduction "none": backward recomputes with the upstream per-token gradients
            losses = op(*inputs, None, *options)[0]
            ctx.save_for_backward(*inputs)
            ctx.stored = False
            return losses
        losses, gh, gw = op(*inputs, scale if wants_grad else None, *options)
        ctx.save_for_backward(gh, gw)
        ctx.stored = True
        return losses.sum() if divisor is None else losses.sum() / divisor  # 0 / 0 = NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.stored:
            gh, gw = (g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        else:
            inputs = ctx.saved_tensors
            op = registry(OP).select(inputs[0].device, inputs[0].dtype, ctx.impl).fn
            scale = grad_out.to(acc_dtype(inputs[0].dtype)).contiguous()
            _, gh, gw = op(*inputs, scale, *ctx.options)
        return gh, gw, None, None, None, None, None, None, None


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor] = None, *, temperature: float = 1.0,
                             kind: str = "kl", beta: float = 0.5, hard_label_weight: float = 0.0,
                             ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                             impl: Optional[str] = None) -> Tensor:
    """Distil the teacher's head ``teacher_hidden @ teacher_weight^T`` into the student's
    ``student_hidden @ student_weight^T`` without materialising either (N, V) logit matrix.

    Args:
        student_hidden: (N, Hs) float32 / bfloat16 / float16 (float64 through the reference).
        student_weight: (V, Hs), the student's head.  teacher_hidden: (N, Ht).  teacher_weight: (V, Ht), the same V.
            All four share a dtype; the teacher's tensors are constants (no gradient flows to them).
        target: (N,) int64 next-token ids in [0, V) or ``ignore_index``, or None (every token counts).  Tokens at
            ``ignore_index`` are excluded from the whole loss, exactly as ``F.cross_entropy`` excludes them.
        temperature: T > 0; both distributions are softmax(logits / T) and the divergence is scaled by T^2.
        kind: "kl" (KL(teacher || student), Hinton's KD), "reverse_kl" (KL(student || teacher)) or "jsd" (the
            generalised Jensen-Shannon divergence with mixing weight ``beta`` in (0, 1)).
        hard_label_weight: a in [0, 1]: loss = (1 - a) T^2 D + a cross_entropy(student logits, target) (needs target).
        reduction: "mean" (over counted tokens; NaN when none counts, as F.cross_entropy), "sum" or "none" ((N,),
            0 at ignored tokens).
        chunk_size: rows per chunk (default ``linear_cross_entropy.default_chunk``).
        impl: force a backend ("cpu", "cuda", "triton", "reference").
    Under ``torch.autocast`` the four tensors are cast as autocast casts ``F.linear``'s inputs.
    Returns:
        a 0-dim loss, or (N,) losses for "none": float32 (float64 for float64 inputs).
    Memory: O(chunk x V) for one chunk of the student's and the teacher's logits plus O(N x Hs + V x Hs) for the
    student's gradients, never O(N x V) (N x H for the hidden states the caller holds anyway).
    Raises ValueError / TypeError for bad shapes, dtypes, devices, options or targets outside [0, V).
    """
    named = (("student_hidden", student_hidden), ("student_weight", student_weight),
             ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight))
    for name, x in named:
        if not isinstance(x, Tensor):
            raise TypeError(f"{OP}: {name} must be a Tensor, got {type(x).__name__}")
    if target is not None and not isinstance(target, Tensor):
        raise TypeError(f"{OP}: target must be a Tensor or None, got {type(target).__name__}")
    student_hidden, student_weight, teacher_hidden, teacher_weight = autocast_like_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight)
    problems = unsupported(student_hidden, student_weight, teacher_hidden, teacher_weight, target)
    if problems:
        raise ValueError(f"{OP}: " + "; ".join(problems))
    temp, b, a = check_options(kind, temperature, beta, hard_label_weight, ignore_index, reduction, target is not None)
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if chunk_size is None:
        chunk = default_chunk(n, vocab, max(student_hidden.shape[1], teacher_hidden.shape[1]))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be an int >= 1, got {chunk_size!r}")
    else:
        chunk = chunk_size
    acc = acc_dtype(student_hidden.dtype)
    if target is None:
        valid = torch.ones(n, dtype=acc, device=student_hidden.device)
    else:
        target = target.long().contiguous()
        if not torch.compiler.is_compiling():  # data-dependent; the kernels check (CPU) or give NaN (GPU)
            check_targets(target, vocab, ignore_index, OP)
        valid = (target != ignore_index).to(acc)
    scale, divisor = reduction_scale(valid, reduction)
    options = (kind, temp, b, a, int(ignore_index), int(chunk))
    return _LinearDistillationLoss.apply(student_hidden.contiguous(), student_weight.contiguous(),
                                         teacher_hidden.detach().contiguous(), teacher_weight.detach().contiguous(),
                                         target, scale, divisor, options, impl)
