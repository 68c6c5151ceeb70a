"""GPU: ``flash_attention(impl="triton")`` forward and backward on CUDA tensors against the float64 reference.

The rule of tests/ops/test_attention.py (FlashAttention's): the error of out, dq, dk, dv against the float64
reference is at most twice PyTorch's own error in the same dtype, plus ``ATTENTION_ATOL[dtype]``.  PyTorch's
same-dtype error is the larger of two: ``scaled_dot_product_attention`` with the same mask as an explicit boolean
attn_mask (as on the CPU), and the plain attention maths in the test dtype (FlashAttention's own yardstick; on a
GPU SDPA may pick a kernel more accurate than any same-dtype attention needs to be).  With dropout, which SDPA
cannot reproduce, only the plain maths, with the contract's dropout mask.  Covered: float16 / bfloat16 / float32; head dims 64, 128, 80 and 72 (a D tile wider than D);
causal, sliding windows, GQA / MQA, dropout (seeds with low / high words 1); L = 2048, 2049 and 1000, Lq != Lk;
and outputs and gradients allocated holding garbage (poisoned).  Shapes stay at one batch, 2-4 heads.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pytrain.ops import attention as attention_op
from pytrain.ops import flash_attention
from pytrain.ops.attention import _window_sides
from pytrain.testing import gpu
from pytrain.testing.attention import check_any_finite_scores
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.tolerances import ATTENTION_ATOL

pytestmark = pytest.mark.gpu

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# (name, dtype, (batch, heads, kv_heads, seqlen_q, seqlen_k, headdim), causal, window, dropout_p, seed)
CASES = [
    ("fp16-d64-causal-2048", "float16", (1, 2, 2, 2048, 2048, 64), True, None, 0.0, 0),
    ("bf16-d128-gqa-2048", "bfloat16", (1, 4, 2, 2048, 2048, 128), False, None, 0.0, 0),
    ("fp32-d64-mqa-causal-1000", "float32", (1, 2, 1, 1000, 1000, 64), True, None, 0.0, 0),
    ("fp16-d80-window-2049", "float16", (1, 2, 2, 2049, 2049, 80), False, (200, 33), 0.0, 0),
    ("bf16-d72-causal-1000x1537", "bfloat16", (1, 2, 2, 1000, 1537, 72), True, None, 0.0, 0),
    ("fp32-d128-window-2048", "float32", (1, 2, 2, 2048, 2048, 128), False, (128, 128), 0.0, 0),
    ("fp16-d128-gqa-causal-dropout-1000", "float16", (1, 4, 2, 1000, 1000, 128), True, None, 0.1, 2**32 + 1),
    ("bf16-d64-window-dropout-2049", "bfloat16", (1, 2, 2, 2049, 2049, 64), False, (None, 64), 0.2, 1),
    ("fp32-d80-causal-dropout-1000", "float32", (1, 2, 1, 1000, 1000, 80), True, None, 0.15, 12345678901),
]


def _inputs(shape, dtype, seed=0):
    b, h, hkv, lq, lk, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    return [t.to(dtype).to(gpu.DEVICE) for t in (q, k, v)], grad.to(gpu.DEVICE)


def _run(fn, qkv, grad):
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _mask(q, k, causal, window):
    left, right = _window_sides(window)
    return attention_op.allowed_mask(q.shape[2], k.shape[2], causal, left, right, q.device)


def _sdpa(causal, window):
    """PyTorch's SDPA in the test dtype with the same mask (rows with no key: 0, as the contract says)."""
    def fn(q, k, v):
        group = q.shape[1] // k.shape[1]
        mask = _mask(q, k, causal, window)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             attn_mask=mask)
        return torch.where(mask.any(-1)[:, None], out, 0.0)
    return fn


def _plain(causal, window, dropout_p, seed):
    """Attention maths in the test dtype (matmuls, softmax and dropout in that dtype), the contract's dropout mask."""
    def fn(q, k, v):
        b, h, lq, d = q.shape
        group = h // k.shape[1]
        mask = _mask(q, k, causal, window)
        s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * (1.0 / math.sqrt(d))
        p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
        p = torch.where(mask.any(-1)[:, None], p, 0.0)
        if dropout_p > 0:
            keep = attention_op._dropout_mask(b, h, lq, k.shape[2], dropout_p, seed, q.device)
            p = p * keep.to(p.dtype) * (1.0 / (1.0 - dropout_p))
        return p @ v.repeat_interleave(group, 1)
    return fn


def check_against_reference(dtype, shape, causal, window, dropout_p, seed, msg):
    dtype = DTYPES[dtype]
    qkv, grad = _inputs(shape, dtype)
    kwargs = dict(causal=causal, window=window, dropout_p=dropout_p, seed=seed)
    exact = _run(lambda q, k, v: flash_attention(q, k, v, impl="reference", **kwargs), [t.double() for t in qkv],
                 grad)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, impl="triton", **kwargs), qkv, grad)
    yardsticks = [_run(_plain(causal, window, dropout_p, seed), qkv, grad)]
    if dropout_p == 0:
        yardsticks.append(_run(_sdpa(causal, window), qkv, grad))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        a, e = ours[i], exact[i]
        assert a.dtype == dtype and a.shape == e.shape and a.device.type == gpu.DEVICE, f"{msg}: {name}"
        ours_err = (a.double() - e).abs().max().item()
        torch_err = max((t[i].double() - e).abs().max().item() for t in yardsticks)
        assert ours_err <= 2 * torch_err + ATTENTION_ATOL[dtype], \
            f"{msg}: {name}: error {ours_err:.3g} vs torch's {torch_err:.3g} (dtype {dtype})"


@pytest.mark.parametrize("name,dtype,shape,causal,window,dropout_p,seed", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(name, dtype, shape, causal, window, dropout_p, seed):
    impl_or_skip("attention_fwd", "triton", gpu.DEVICE)
    impl_or_skip("attention_bwd", "triton", gpu.DEVICE)
    check_against_reference(dtype, shape, causal, window, dropout_p, seed, name)


def test_rows_without_keys_give_zero_and_finite_grads():
    """Lq > Lk with a causal mask: the first Lq - Lk rows see no key (out 0, lse -inf, finite gradients)."""
    impl_or_skip("attention_fwd", "triton", gpu.DEVICE)
    qkv, grad = _inputs((1, 2, 1, 300, 100, 64), torch.float16)
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    out, lse = flash_attention(*leaves, causal=True, return_lse=True, impl="triton")
    out.backward(grad.to(out.dtype))
    assert torch.equal(out[:, :, :200].float().cpu(), torch.zeros(1, 2, 200, 64))
    assert bool(torch.isinf(lse[:, :, :200]).all()) and bool(torch.isfinite(lse[:, :, 200:]).all())
    assert all(bool(torch.isfinite(t.grad).all()) for t in leaves)


def test_deterministic():
    """Forward and backward are bit-identical across runs (no atomics)."""
    impl_or_skip("attention_fwd", "triton", gpu.DEVICE)
    qkv, grad = _inputs((1, 4, 2, 1000, 1000, 64), torch.bfloat16)
    first = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="triton"), qkv, grad)
    second = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="triton"), qkv, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("byte", gpu.POISON_BYTES, ids=hex)
def test_poisoned_outputs(byte):
    """out, lse, delta, dq, dk, dv allocated holding garbage: every element must be written (odd L and head dim,
    GQA, a window that leaves whole key blocks unvisited)."""
    impl_or_skip("attention_fwd", "triton", gpu.DEVICE)
    with gpu.poisoned(byte):
        check_against_reference("float16", (1, 4, 2, 1000, 1000, 80), True, (100, 0), 0.0, 0, f"poisoned {byte:#x}")


@pytest.mark.parametrize("scale", [3e9, -3e9])
def test_any_finite_scores(scale):
    """Scores far past exp's range, compiled (mul.rn scores, natural-log lse): float32 forward and backward
    against the float64 reference within the bounds of pytrain.testing.attention, rows with no key included."""
    impl_or_skip("attention_fwd", "triton", gpu.DEVICE)
    (q, k, v), grad = _inputs((1, 2, 1, 300, 257, 64), torch.float32)
    check_any_finite_scores("triton", q, k, v, grad.float(), scale=scale, causal=True)
