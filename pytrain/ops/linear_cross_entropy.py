"""Fused linear + cross-entropy: the loss of a language-model head and its gradients without the (N, V) logits.

Op (namespace ``pytrain``):

* ``linear_cross_entropy(hidden, weight, target, bias?, grad_scale?, ignore_index, label_smoothing, z_loss,
  softcap, chunk) -> (losses, grad_hidden, grad_weight, grad_bias)``

Shapes: hidden (N, H), weight (V, H), target (N,) int64, bias (V,) or None, grad_scale (N,) float32 or None.
For every token i with target t = target[i] != ignore_index (eps = label_smoothing, c = softcap):

    x[i, j]  = hidden[i] . weight[j] + bias[j]
    z[i, j]  = c * tanh(x[i, j] / c)                    (softcap; z = x when softcap is None / 0)
    lse[i]   = log sum_j exp(z[i, j])                   (online: row max, then one sum of exp)
    p[i, j]  = exp(z[i, j] - lse[i])
    loss[i]  = lse[i] - (1 - eps) z[i, t] - eps / V sum_j z[i, j]  +  z_loss * lse[i]^2
    dz[i, j] = p[i, j] (1 + 2 z_loss lse[i]) - (1 - eps) [j == t] - eps / V
    dx[i, j] = g[i] * dz[i, j] * (1 - (z[i, j] / c)^2)  (tanh' chain rule; factor 1 without softcap)

The loss is F.cross_entropy's with label smoothing (``(1 - eps) nll + eps * mean_j(-log p_j)``) plus the
z-loss of PaLM (Chowdhery et al. 2022).  Ignored tokens have loss 0 and dx = 0.  g = grad_scale: when it is
given the op also returns

    grad_hidden = dx @ weight          (N, H), hidden's dtype
    grad_weight = dx^T @ hidden        (V, H), weight's dtype (accumulated over chunks in float32)
    grad_bias   = sum_i dx[i]          (V,),   bias's dtype (empty when bias is None)

and empty tensors otherwise.  losses: (N,) float32 (float64 for float64 inputs).

Every backend walks the tokens in chunks of ``chunk`` rows (the C++ backends share the walk of
``csrc/linear_chunks.h``, Triton that of ``kernels/linear_chunks.py``): the logits chunk comes from torch's GEMM
(at::mm / torch.mm: cuBLAS on CUDA, AMX or oneDNN for bfloat16 on the CPU), one fused pass turns it in place into dx
and the losses, and two more GEMMs give that chunk's grad_hidden rows and its share of grad_weight.  Peak extra
memory is O(chunk x V) for the chunk plus O(N x H + V x H) for the gradients, never O(N x V).  The public
``linear_cross_entropy`` computes the gradients in the forward pass when the reduction is a sum or mean
(Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``), so backward is a scale by grad_output; with
``reduction="none"`` the per-token upstream gradients are unknown at forward time, so backward reruns the chunked
pass with them (recompute rather than store, as in Cut Cross-Entropy: Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", Apple 2024).

Backends: ``csrc/cpu/linear_cross_entropy.cpp`` (CPU: a SIMD + OpenMP row pass),
``csrc/cuda/linear_cross_entropy.cu`` (CUDA C++: one block per token row), ``kernels/linear_cross_entropy.py``
(Triton: one program per token row), all float32 / bfloat16 / float16 with float32 accumulation.  The reference
below is their contract (and serves float64).  A target outside [0, V) that is not ignore_index is an error on the
CPU and a NaN loss and gradient row on the GPU backends (no device sync in the kernel); the public function checks
targets first, except under torch.compile.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .library import define_op
from .registry import FLOAT_DTYPES, registry

SCHEMA = ("(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor? grad_scale, int ignore_index, "
          "float label_smoothing, float z_loss, float softcap, int chunk) -> (Tensor, Tensor, Tensor, Tensor)")
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


MIN_CHUNK = 1024  # rows: GEMMs of fewer rows re-pack the (V, H) weight too often for their work (CPU: 2-4x slower)


def autocast_like_linear(*tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Under ``torch.autocast``, the inputs of the linear layer as autocast hands them to ``F.linear``: floating
    tensors on the autocast device, float64 excepted, in the autocast dtype (the loss stays float32)."""
    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 \
                or not torch.amp.is_autocast_available(t.device.type) or not torch.is_autocast_enabled(t.device.type):
            return t
        return t.to(torch.get_autocast_dtype(t.device.type))
    return tuple(cast(t) for t in tensors)


def default_chunk(n: int, vocab: int, hidden_size: int) -> int:
    """Rows per chunk: N / ceil(V / H), so the chunk's logits (chunk x V) are no larger than hidden (N x H)
    (Liger-Kernel's rule), but at least ``MIN_CHUNK`` rows (or N), so each chunk's GEMMs stay efficient."""
    liger = math.ceil(n / max(1, math.ceil(vocab / max(1, hidden_size))))
    return max(1, min(n, max(liger, MIN_CHUNK)))


# ------------------------------------------------------------------------------------------ reference


def token_losses_reference(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                           z_loss: float, softcap: float) -> Tensor:
    """Per-token losses (N,) of the materialised logits x (N, V) as the module docstring defines (differentiable)."""
    z = softcap * torch.tanh(logits / softcap) if softcap > 0 else logits
    losses = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                             reduction="none")
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        losses = losses + z_loss * torch.where(target != ignore_index, lse * lse, torch.zeros_like(lse))
    return losses


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                   grad_scale: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                   z_loss: float, softcap: float, chunk: int):
    """Materialised in float32 (float64 for float64 inputs), gradients by the formulas of the module docstring
    (tests check them against autograd).  ``chunk`` is ignored."""
    check_targets(target, weight.shape[0], ignore_index)
    acc = acc_dtype(hidden.dtype)
    h, w = hidden.to(acc), weight.to(acc)
    x = F.linear(h, w, None if bias is None else bias.to(acc))
    losses = token_losses_reference(x, target, ignore_index, label_smoothing, z_loss, softcap)
    if grad_scale is None:
        return losses, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0)
    z = softcap * torch.tanh(x / softcap) if softcap > 0 else x
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    keep = target != ignore_index
    onehot = F.one_hot(torch.where(keep, target, 0), x.shape[1]).to(acc)
    dz = torch.exp(z - lse) * (1 + 2 * z_loss * lse) - label_smoothing / x.shape[1] - (1 - label_smoothing) * onehot
    if softcap > 0:
        dz = dz * (1 - (z / softcap) ** 2)
    dx = dz * torch.where(keep, grad_scale.to(acc), 0.0)[:, None]  # ignored rows: 0 even for a NaN scale
    grad_bias = dx.sum(0).to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return losses, (dx @ w).to(hidden.dtype), (dx.t() @ h).to(weight.dtype), grad_bias


# ------------------------------------------------------------------------------------------ input rules


def check_targets(target: Tensor, vocab: int, ignore_index: int, op: str = "linear_cross_entropy") -> None:
    """Every target is ignore_index or in [0, V) (one device sync), as F.cross_entropy demands (``op`` names the
    caller in the error)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: target[{first}] = {int(target[first])} is outside [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def unsupported(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> List[str]:
    """Why the fused op cannot take these inputs (empty when it can)."""
    out = []
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            return [f"{name} must be a Tensor, got {type(t).__name__}"]
    if hidden.dim() != 2 or weight.dim() != 2:
        out.append(f"hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    elif hidden.shape[1] != weight.shape[1]:
        out.append(f"hidden (N, H) = {tuple(hidden.shape)} and weight (V, H) = {tuple(weight.shape)} differ in H")
    elif weight.shape[0] == 0:
        out.append("weight has V = 0 rows: no class to predict")
    if target.dim() != 1 or (hidden.dim() == 2 and target.shape[0] != hidden.shape[0]):
        out.append(f"target must be (N,) = ({hidden.shape[0] if hidden.dim() else '?'},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        out.append(f"target must be int64 (or int32), got {target.dtype}")
    if hidden.dtype not in FLOAT_DTYPES + (torch.float64,):
        out.append(f"hidden has dtype {hidden.dtype}; supported: float32, bfloat16, float16, float64")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        out.append(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}, "
                   f"{None if bias is None else bias.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        out.append(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, target, bias) if t is not None}
    if len(devices) > 1:
        out.append(f"hidden, weight, target and bias must be on one device, got {sorted(map(str, devices))}")
    return out


# ------------------------------------------------------------------------------------------ op


def _fake(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, z_loss, softcap, chunk):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
                 and target.shape == hidden.shape[:1],
                 lambda: f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"target {tuple(target.shape)}")
    losses = hidden.new_empty(hidden.shape[:1], dtype=acc_dtype(hidden.dtype))
    if grad_scale is None:
        return losses, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0)
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return losses, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _triton(*args):
    from ..kernels.linear_cross_entropy import linear_cross_entropy as launch
    return launch(*args)


define_op("linear_cross_entropy", SCHEMA, reference=linear_cross_entropy_reference, fake=_fake, triton=_triton)


# ------------------------------------------------------------------------------------------ autograd
# The one place that wires the op into autograd: reductions "mean" / "sum" get their gradients in the forward
# pass (backward scales them); "none" reruns the chunked pass in backward with the per-token upstream gradients.


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, scale, divisor, options, impl):
        op = registry("linear_cross_entropy").select(hidden.device, hidden.dtype, impl).fn
        wants_grad = any(ctx.needs_input_grad[:2]) or (bias is not None and ctx.needs_input_grad[3])
        ctx.options, ctx.impl, ctx.has_bias = options, impl, bias is not None
        if scale is None:  # reduction "none": backward recomputes with the upstream per-token gradients
            losses = op(hidden, weight, target, bias, None, *options)[0]
            ctx.save_for_backward(hidden, weight, target, bias)
            ctx.stored = False
            return losses
        losses, gh, gw, gb = op(hidden, weight, target, bias, scale if wants_grad else None, *options)
        ctx.save_for_backward(gh, gw, gb)
        ctx.stored = True
        return losses.sum() if divisor is None else losses.sum() / divisor  # 0 / 0 = NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.stored:
            gh, gw, gb = (g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        else:
            hidden, weight, target, bias = ctx.saved_tensors
            op = registry("linear_cross_entropy").select(hidden.device, hidden.dtype, ctx.impl).fn
            scale = grad_out.to(acc_dtype(hidden.dtype)).contiguous()
            _, gh, gw, gb = op(hidden, weight, target, bias, scale, *ctx.options)
        return gh, gw, None, (gb if ctx.has_bias else None), None, None, None, None


def real_option(op: str, name: str, value: object) -> float:
    """``value`` as a finite float; TypeError / ValueError naming ``op`` and ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def reduction_scale(valid: Tensor, reduction: str, divisor=None) -> Tuple[Optional[Tensor], object]:
    """(per-token gradient scale, divisor of the summed losses) of a reduction over tokens whose ``valid`` (N,) is 1
    (counted) or 0: "none": (None, None), "sum": (valid, None), "mean": (valid / divisor, divisor), the divisor
    being the count of valid tokens unless one is given (an int or 0-dim tensor)."""
    if reduction == "none":
        return None, None
    if reduction == "sum":
        return valid, None
    if divisor is None:
        divisor = valid.sum()
    elif isinstance(divisor, Tensor):
        divisor = divisor.to(valid.device, valid.dtype)
    return valid / divisor, divisor


def check_options(ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                  reduction: str) -> Tuple[float, float, float]:
    """Validated (label_smoothing, z_loss, softcap as a float with 0 for none)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    eps = real_option("linear_cross_entropy", "label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {eps}")
    zl = real_option("linear_cross_entropy", "z_loss", z_loss)
    if zl < 0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0, got {zl}")
    cap = 0.0 if softcap is None else real_option("linear_cross_entropy", "softcap", softcap)
    if softcap is not None and cap <= 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 (or None), got {cap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return eps, zl, cap


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean", num_items_in_batch=None,
                         chunk_size: Optional[int] = None, impl: Optional[str] = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` without materialising the (N, V) logits.

    Args:
        hidden: (N, H) float32 / bfloat16 / float16 (float64 through the reference).
        weight: (V, H), the head (e.g. ``lm_head.weight``); any V.  bias: (V,) or None.  Same dtype as hidden.
        target: (N,) int64 class indices in [0, V), or ``ignore_index`` for tokens that do not count.
        label_smoothing, ignore_index: as ``F.cross_entropy``.  z_loss: adds ``z_loss * lse^2`` per token.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2) before the softmax.
        reduction: "mean" (over non-ignored tokens, exactly as F.cross_entropy: NaN when all are ignored),
            "sum" or "none" ((N,) per-token losses, 0 at ignored tokens).
        num_items_in_batch: with "mean", divide the sum by this count (int or 0-dim tensor) instead of by the
            non-ignored tokens: Hugging Face's loss normalisation under gradient accumulation.
        chunk_size: rows per chunk (default ``default_chunk``).
        impl: force a backend ("cpu", "cuda", "triton", "reference").
    Under ``torch.autocast`` hidden, weight and bias are cast as autocast casts ``F.linear``'s inputs.
    Returns:
        a 0-dim loss, or (N,) losses for "none": float32 (float64 for float64 inputs).
    Memory: O(chunk x V) for one chunk of logits (chunk = max(N / ceil(V / H), 1024) by default, at most N)
    plus O(N x H + V x H) for the gradients (never O(N x V));
    with "mean" / "sum" the gradients are computed in the forward pass and held until backward.
    Raises ValueError / TypeError for bad shapes, dtypes, options or targets outside [0, V).
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a Tensor, got {type(t).__name__}")
    hidden, weight, bias = autocast_like_linear(hidden, weight, bias)
    problems = unsupported(hidden, weight, target, bias)
    if problems:
        raise ValueError("linear_cross_entropy: " + "; ".join(problems))
    eps, zl, cap = check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
    n, vocab = hidden.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk = default_chunk(n, vocab, hidden.shape[1])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be an int >= 1, got {chunk_size!r}")
    else:
        chunk = chunk_size
    target = target.long().contiguous()
    if not torch.compiler.is_compiling():  # a data-dependent check; the kernels check (CPU) or give NaN (GPU)
        check_targets(target, vocab, ignore_index)
    valid = (target != ignore_index).to(acc_dtype(hidden.dtype))
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"linear_cross_entropy: num_items_in_batch replaces the mean's divisor; it needs "
                         f"reduction='mean', got {reduction!r}")
    scale, divisor = reduction_scale(valid, reduction, num_items_in_batch)
    options = (int(ignore_index), eps, zl, cap, int(chunk))
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), target,
                                     None if bias is None else bias.contiguous(), scale, divisor, options, impl)
