"""Flash attention: schemas, fakes, the reference, the input contract and the public ``flash_attention``.

Ops (namespace ``pytrain``):

* ``attention_fwd(q, k, v, scale, causal, window_left, window_right, dropout_p, seed) -> (out, lse)``
  (``seed``: the dropout seed, a one-element int64 CPU tensor: ``flash_attention`` draws it with
  ``torch.randint``, which ``torch.compile`` captures in the graph where an int would need ``.item()``)
* ``attention_bwd(grad_out, q, k, v, out, lse, scale, causal, window_left, window_right, dropout_p, seed)
  -> (dq, dk, dv)``

The forward saves only ``out`` and the log-sum-exp ``lse``; the backward recomputes the probabilities
tile by tile (FlashAttention-2, Dao 2023).  Backends: ``csrc/cpu/attention.cpp`` (CPU) and
``kernels/attention.py`` (Triton, the GPU path); the reference below is their contract.

Shapes: q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H % Hkv == 0 (GQA/MQA: query head
h reads kv head h // (H // Hkv)); out (B, H, Lq, D) in q's dtype; lse (B, H, Lq) float32
(float64 for float64 inputs).

    S[i, j]  = scale * q[i] . k[j]            (scale defaults to 1 / sqrt(D))
    allowed  = j - i - (Lk - Lq) in [-left, right]
             causal: right = 0;  window=None: left = right = unbounded
    lse[i]   = log sum_{allowed j} exp(S[i, j])            (-inf when row i allows no key)
    P[i, j]  = exp(S[i, j] - lse[i])  if allowed else 0
    out[i]   = sum_j  P[i, j] * keep[i, j] / (1 - p) * v[j]   (rows with no key: 0)

Causal masks are aligned bottom-right, as in FlashAttention >= 2.1: the last query sees
every key, and with Lq > Lk the first Lq - Lk queries see none.  Lq = 5, Lk = 3:

    keys ->  0 1 2
    q0       . . .
    q1       . . .
    q2       x . .
    q3       x x .
    q4       x x x

Dropout keeps P[i, j] when ``dropout_keep(seed, b*H + h, i, j, p)`` holds: a
stateless hash of the element's coordinates (three rounds of the "lowbias32" integer
hash of C. Wellons), identical in every backend, so the backward pass regenerates
the forward's mask from the seed alone and tests compare backends exactly.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .hash import MASK32, lowbias32
from .library import define_op, register_autocast_lower_precision, register_autograd
from .registry import FLOAT_DTYPES, registry

FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window_left, int window_right, "
              "float dropout_p, Tensor seed) -> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal, "
              "int window_left, int window_right, float dropout_p, Tensor seed) -> (Tensor, Tensor, Tensor)")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
UNBOUNDED = -1  # window side with no limit


# ------------------------------------------------------------------------------------------ reference
def dropout_threshold(p: float) -> int:
    """Keep an element when its hash >= this uint32 threshold (probability 1 - p)."""
    return min(int(p * 2**32), MASK32)


def dropout_keep(seed: int, bh: Tensor, i: Tensor, j: Tensor, p: float) -> Tensor:
    """Boolean keep mask for coordinates (bh = b * H + h, query i, key j), broadcast together.

    x = h(j ^ s0); x = h(x ^ i); x = h(x ^ bh ^ s1), with s0, s1 the low and high 32 bits of seed.
    """
    s0, s1 = seed & MASK32, (seed >> 32) & MASK32
    x = lowbias32(j ^ s0)
    x = lowbias32(x ^ i)
    x = lowbias32(x ^ bh ^ s1)
    return x >= dropout_threshold(p)


def allowed_mask(lq: int, lk: int, causal: bool, window_left: int, window_right: int, device=None) -> Tensor:
    """(Lq, Lk) boolean mask of the keys each query may attend to (see module docstring)."""
    offset = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None] - (lk - lq)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    right = 0 if causal else window_right
    if right != UNBOUNDED:
        ok &= offset <= right
    if window_left != UNBOUNDED:
        ok &= offset >= -window_left
    return ok


def _dropout_mask(b: int, h: int, lq: int, lk: int, p: float, seed: int, device) -> Tensor:
    bh = torch.arange(b * h, device=device).view(b, h, 1, 1)
    i = torch.arange(lq, device=device).view(1, 1, lq, 1)
    j = torch.arange(lk, device=device).view(1, 1, 1, lk)
    return dropout_keep(seed, bh, i, j, p)


def seed_value(seed: Tensor) -> int:
    """The ops' dropout seed (a one-element integer CPU tensor) as an int, read on the host; the C++ kernel
    reads and checks it alike (``csrc/attention_checks.h``)."""
    if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.device.type != "cpu" or \
            seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
        got = (f"shape {tuple(seed.shape)}, dtype {seed.dtype} on {seed.device}" if isinstance(seed, Tensor)
               else type(seed).__name__)
        raise ValueError(f"attention: seed must be a one-element integer CPU tensor, got {got}")
    return int(seed)


def seed_tensor(seed: int) -> Tensor:
    """``seed`` as the ops take it (``seed_value``'s inverse)."""
    return torch.tensor(seed, dtype=torch.int64)


def attention_fwd_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
                      window_right: int, dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    """Materialised attention: returns (out, lse).  Differentiable (autograd gives the reference backward)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = h // hkv
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    s = scale * (q.to(acc) @ kf.transpose(-1, -2))
    ok = allowed_mask(lq, lk, causal, window_left, window_right, q.device)
    s = s.masked_fill(~ok, -math.inf)
    has_key = ok.any(dim=-1)  # rows that allow no key get lse = -inf, P = 0, no NaN in any gradient
    lse_finite = torch.logsumexp(s.masked_fill(~has_key[:, None], 0.0), dim=-1)
    p = torch.exp(s - lse_finite.unsqueeze(-1))
    lse = lse_finite.masked_fill(~has_key, -math.inf)
    if dropout_p > 0:
        p = p * _dropout_mask(b, h, lq, lk, dropout_p, seed_value(seed), q.device) / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype), lse


def attention_bwd_reference(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool, window_left: int, window_right: int, dropout_p: float,
                       seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the reference forward by autograd, in the inputs' dtypes."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, _ = attention_fwd_reference(*leaves, scale, causal, window_left, window_right, dropout_p, seed)
        grads = torch.autograd.grad(o, leaves, grad_out.to(o.dtype), allow_unused=True)
    return tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves))


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ------------------------------------------------------------------------------------------ contract
def _problems(q: Tensor, k: Tensor, v: Tensor, dtype: Optional[torch.dtype]) -> List[Tuple[type, str]]:
    """Every way q, k, v break the contract, with the exception type each one raises."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            return [(TypeError, f"{name} must be a tensor, got {type(t).__name__}")]
        if t.dim() != 4:
            return [(ValueError, f"{name} must be 4-D (batch, heads, seqlen, headdim), got shape {tuple(t.shape)}")]
        if t.is_nested:
            return [(ValueError, "nested tensors are not supported")]
    out: List[Tuple[type, str]] = []
    dtypes = {dtype or t.dtype for t in (q, k, v)}
    if len(dtypes) > 1:
        out.append((TypeError, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"))
    elif not dtypes <= set(FLOAT_DTYPES + (torch.float64,)):
        out.append((TypeError, f"dtype {dtypes.pop()} not supported (float32, bfloat16, float16)"))
    if not (q.device == k.device == v.device):
        out.append((RuntimeError, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"))
    if k.shape != v.shape:
        out.append((ValueError, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"))
    (b, h, _, d), (bk, hk, _, dk) = q.shape, k.shape
    if b != bk:
        out.append((ValueError, f"batch sizes differ: q has {b}, k/v have {bk}"))
    if d != dk:
        out.append((ValueError, f"head dims differ: q has {d}, k/v have {dk}"))
    if hk == 0 or h % hk != 0:
        out.append((ValueError, f"q heads ({h}) must be a multiple of k/v heads ({hk}) (GQA/MQA)"))
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        out.append((ValueError, head_dim_unsupported(d)))
    return out


def head_dim_unsupported(head_dim: int) -> Optional[str]:
    """Why a head dim is out of the kernels' range (None when it is in it)."""
    if MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return None
    return f"head dim {head_dim} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"


def unsupported(q: Tensor, k: Tensor, v: Tensor, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Why ``flash_attention(q, k, v)`` cannot compute these inputs (empty when it can).

    dtype: the dtype the call will run in, if not the tensors' own (under autocast).  The raising path
    (``flash_attention``) and the callers that decline to PyTorch instead (``pytrain.swap``,
    ``pytrain.nn``) use these same rules.
    """
    return [message for _, message in _problems(q, k, v, dtype)]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dtype: Optional[torch.dtype]) -> None:
    problems = _problems(q, k, v, dtype)
    if problems:
        kind, message = problems[0]
        raise kind(f"flash_attention: {message}")


# ------------------------------------------------------------------------------------------ ops
def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, scale, causal, window_left, window_right, dropout_p, seed):
    torch._check(q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3],
                 lambda: f"attention_fwd: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _bwd_fake(grad_out, q, k, v, out, lse, scale, causal, window_left, window_right, dropout_p, seed):
    torch._check(grad_out.shape == q.shape and out.shape == q.shape and lse.shape == q.shape[:3],
                 lambda: f"attention_bwd: grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)}, "
                         f"lse {tuple(lse.shape)} for q {tuple(q.shape)}")
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _triton_fwd(*args):
    from ..kernels.attention import attention_forward
    return attention_forward(*args[:-1], seed_value(args[-1]))


def _triton_bwd(*args):
    from ..kernels.attention import attention_backward
    return attention_backward(*args[:-1], seed_value(args[-1]))


# The CPU kernels are C++; on GPUs the Triton kernels serve (there is no CUDA C++ attention).
define_op("attention_fwd", FWD_SCHEMA, reference=attention_fwd_reference, fake=_fwd_fake, triton=_triton_fwd,
          compiled=("cpu",))
define_op("attention_bwd", BWD_SCHEMA, reference=attention_bwd_reference, fake=_bwd_fake, triton=_triton_bwd,
          compiled=("cpu",))

Window = Optional[Tuple[Optional[int], Optional[int]]]


def _window_sides(window: Window) -> Tuple[int, int]:
    """(left, right) with -1 for an unbounded side; None means full attention."""
    if window is None:
        return UNBOUNDED, UNBOUNDED
    if not isinstance(window, (tuple, list)):
        raise TypeError(f"flash_attention: window must be a (left, right) pair or None, got {window!r}")
    if len(window) != 2:
        raise ValueError(f"flash_attention: window must be (left, right), got {window!r}")
    sides = []
    for side in window:
        if isinstance(side, bool):  # an int to Python, but never a window size
            raise TypeError(f"flash_attention: window sides must be ints, got {window!r}")
        if side is None or side == UNBOUNDED:
            sides.append(UNBOUNDED)
        elif isinstance(side, int) and side >= 0:
            sides.append(side)
        else:
            raise ValueError(f"flash_attention: window sides must be ints >= 0 (or None / -1 for unbounded), "
                             f"got {window!r}")
    return sides[0], sides[1]


def _check_real(name: str, value: object) -> float:
    """``value`` as a float if it is a real number (not a bool, str or None): TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"flash_attention: {name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *args, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _backward_of(suffix: str):
    """The backward of ``attention_fwd<suffix>``: ``attention_bwd<suffix>``, the same backend's."""
    bwd = getattr(torch.ops.pytrain, "attention_bwd" + suffix)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        dq, dk, dv = bwd(grad_out, q, k, v, out, lse, *ctx.args, seed)
        return (dq, dk, dv) + (None,) * (len(ctx.args) + 1)

    return backward


register_autograd("attention_fwd", _backward_of, _setup_context)
register_autocast_lower_precision("attention_fwd")  # as autocast treats F.scaled_dot_product_attention


def _autocast_dtype(q: Tensor, k: Tensor, v: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast hands the op q, k, v in (``register_autocast_lower_precision``), or None when
    autocast leaves them as they are (off on their device, or float64 among them)."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return None
    device_type = q.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if any(t.dtype not in FLOAT_DTYPES for t in (q, k, v)):
        return None
    return torch.get_autocast_dtype(device_type)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    window: Window = None, dropout_p: float = 0.0, return_lse: bool = False,
                    seed: Optional[int] = None, impl: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention without materialising the (seqlen_q, seqlen_k) score matrix.

    Args:
        q: (batch, heads, seqlen_q, headdim); headdim in [16, 256].
        k, v: (batch, kv_heads, seqlen_k, headdim); heads % kv_heads == 0 (GQA / MQA).
        causal: mask keys after the query, aligned bottom-right when seqlen_q != seqlen_k
            (see the module docstring for the picture).
        scale: score scale, default 1 / sqrt(headdim).
        window: (left, right) sliding window: query i sees keys j with
            -left <= j - i - (seqlen_k - seqlen_q) <= right; None or -1 for an unbounded side.
        dropout_p: probability of dropping an attention weight (training); reproducible from ``seed``
            (default: drawn from torch's global CPU generator, as a tensor, so ``torch.compile`` draws it in
            the graph, a new one each call, instead of breaking on ``.item()``).
        return_lse: also return the log-sum-exp (batch, heads, seqlen_q), float32.
            Under ``torch.autocast`` q, k, v are cast as for ``F.scaled_dot_product_attention``: float32 /
            bfloat16 / float16 inputs on the autocast device to its autocast dtype (float64 stays).
        impl: force a backend ("cpu", "triton", "reference", ...).
    Returns:
        out (batch, heads, seqlen_q, headdim) in q's dtype, or (out, lse).  Rows that may see no key give 0.
    """
    _check_inputs(q, k, v, _autocast_dtype(q, k, v))
    window_left, window_right = _window_sides(window)
    dropout_p = _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    scale = default_scale(q.shape[-1], None if scale is None else _check_real("scale", scale))
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be finite, got {scale}")
    if seed is None:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else seed_tensor(0)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"flash_attention: seed must be an int or None, got {type(seed).__name__}")
    else:
        seed = seed_tensor(seed)
    dtype = _autocast_dtype(q, k, v) or q.dtype
    if q.numel() == 0 or k.shape[2] == 0:
        out = (q * 0.0).to(dtype)  # nothing to attend: zeros that still carry (zero) gradients
        lse = torch.full(q.shape[:3], -math.inf, dtype=_lse_dtype(q), device=q.device)
    else:
        fwd = registry("attention_fwd").select(q.device, dtype, impl).fn  # autograd and autocast: registered
        out, lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), scale, causal, window_left, window_right,
                       float(dropout_p), seed)
    return (out, lse) if return_lse else out
