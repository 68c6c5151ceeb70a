"""pytrain.ops.linear_cross_entropy: loss and gradients of every CPU-runnable backend against float64.

Each backend's normwise error against the float64 reference must be at most twice PyTorch's own error in the
same dtype (F.linear in that dtype, cross-entropy in float32) plus ``LINEAR_CROSS_ENTROPY_RTOL[dtype]``.
Triton runs through its interpreter in float32 / float16 (numpy has no bfloat16).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pytrain.ops import linear_cross_entropy
from pytrain.ops.linear_cross_entropy import default_chunk
from pytrain.testing.backends import CPU_IMPLS, backend_op, impl_or_skip
from pytrain.testing.linear_losses import (IGNORE, check_cross_entropy, cross_entropy_inputs, loss_and_grads,
                                           stock_cross_entropy)

OP = "linear_cross_entropy"
N, H, V = 37, 16, 1003  # odd V, N not a multiple of the chunk

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "num_items": {"num_items_in_batch": 50},
}


def _inputs(dtype, bias=True, n=N, vocab=V, seed=0):
    return cross_entropy_inputs(dtype, n, H, vocab, bias, seed)


def _loss_and_grads(fn, h, w, t, b, **kw):
    return loss_and_grads(fn, (h, w, t, b), (0, 1, 3), **kw)


def _check_against_float64(impl, dtype, bias=True, chunk_size=8, options=None, n=N, vocab=V):
    check_cross_entropy(impl, dtype, n=n, hidden=H, vocab=vocab, bias=bias, chunk_size=chunk_size, options=options)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_float64(impl, dtype, option):
    impl_or_skip(OP, impl)
    if impl == "triton" and (dtype == torch.bfloat16 or option not in ("plain", "all", "none")):
        pytest.skip("the Triton interpreter runs float32 / float16 on the plain, all-options and 'none' cases "
                    "(bfloat16 has no numpy type; the other options are the same kernel code paths)")
    _check_against_float64(impl, dtype, options=OPTIONS[option])


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 100])
def test_chunk_boundaries(chunk_size):
    impl_or_skip(OP, "cpu")
    _check_against_float64("cpu", torch.float32, chunk_size=chunk_size, options=OPTIONS["all"])


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_without_bias_tiny_vocab(impl):
    impl_or_skip(OP, impl)
    _check_against_float64(impl, torch.float32, bias=False, chunk_size=4, n=9, vocab=3)


def test_reference_is_torch_cross_entropy():
    """The float64 reference equals F.linear + F.cross_entropy, and the z-loss term is z_loss * lse^2."""
    h, w, t, b = (x.double() if x.is_floating_point() else x for x in _inputs(torch.float32))
    logits = F.linear(h, w, b)
    got = linear_cross_entropy(h, w, t, b, impl="reference", label_smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(logits, t, ignore_index=IGNORE, label_smoothing=0.1))
    per_token = linear_cross_entropy(h, w, t, b, impl="reference", z_loss=0.5, reduction="none")
    keep = t != IGNORE
    lse = torch.logsumexp(logits, -1)
    want = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none") + 0.5 * lse * lse * keep
    torch.testing.assert_close(per_token, want)
    capped = linear_cross_entropy(h, w, t, b, impl="reference", softcap=2.0)
    torch.testing.assert_close(capped, F.cross_entropy(2.0 * torch.tanh(logits / 2.0), t, ignore_index=IGNORE))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_all_ignored_mean_is_nan_with_zero_grads_like_torch(impl):
    impl_or_skip(OP, impl)
    h, w, _, b = _inputs(torch.float32)
    t = torch.full((N,), IGNORE)
    loss, gh, gw, gb = _loss_and_grads(linear_cross_entropy, h, w, t, b, impl=impl)
    stock_loss, *stock_grads = _loss_and_grads(lambda *a: F.cross_entropy(F.linear(*a[:2], a[3]), a[2]), h, w, t, b)
    assert math.isnan(float(loss)) and math.isnan(float(stock_loss))
    for ours, theirs in zip((gh, gw, gb), stock_grads):
        assert torch.equal(ours, torch.zeros_like(ours)) and torch.equal(theirs, torch.zeros_like(theirs))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_num_items_in_batch_is_huggingface_sum_over_count(impl):
    """HF under gradient accumulation: sum of the micro-batch's token losses / items over all micro-batches."""
    impl_or_skip(OP, impl)
    h, w, t, b = _inputs(torch.float32)
    total = linear_cross_entropy(h, w, t, b, impl=impl, reduction="sum")
    for items in (123, torch.tensor(123)):
        got = linear_cross_entropy(h, w, t, b, impl=impl, num_items_in_batch=items)
        torch.testing.assert_close(got, total / 123)


def test_default_chunk_is_liger_rule_with_a_floor():
    from pytrain.ops.linear_cross_entropy import MIN_CHUNK
    for n, vocab, hid in ((4096, 32000, 2048), (4096, 128256, 2048), (37, 1003, 16), (1, 50257, 8192), (0, 5, 3),
                          (100000, 32000, 4096)):
        c = default_chunk(n, vocab, hid)
        assert 1 <= c and (n == 0 or c <= n)
        assert c == min(n, MIN_CHUNK) or c * vocab <= n * hid + vocab, (n, vocab, hid, c)
    assert default_chunk(4096, 128256, 2048) == MIN_CHUNK  # a quarter of the logits at a time


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_opcheck(impl):
    impl_or_skip(OP, impl)
    name = {"cpu": OP, "reference": OP + "_reference", "triton": OP + "_triton"}[impl]
    h, w, t, b = _inputs(torch.float32, n=9, vocab=13)
    scale = torch.rand(9)
    op = getattr(torch.ops.pytrain, name).default
    torch.library.opcheck(op, (h, w, t, b, scale, IGNORE, 0.1, 1e-3, 2.0, 4))
    torch.library.opcheck(op, (h, w, t, None, None, IGNORE, 0.0, 0.0, 0.0, 4))


def test_reference_gradients_are_autograd_of_torch():
    """The reference's gradient formulas (softmax - smoothed one-hot, z-loss, tanh') equal autograd's, in float64."""
    h, w, t, b = (x.double() if x.is_floating_point() else x for x in _inputs(torch.float32))
    options = {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "reduction": "none"}
    expected = _loss_and_grads(stock_cross_entropy, h, w, t, b, **options)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, b, impl="reference", **options)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_kernel_rejects_or_poisons_out_of_range_target(impl):
    """The kernels themselves (reached without the public function's host check): CPU raises, Triton gives NaN."""
    impl_or_skip(OP, impl)
    h, w, t, b = _inputs(torch.float32, n=9, vocab=7)
    t[2] = 7
    op = backend_op(OP, impl)
    if impl == "cpu":
        with pytest.raises(RuntimeError, match=r"target\[2\] = 7 is outside \[0, 7\)"):
            op(h, w, t, b, None, IGNORE, 0.0, 0.0, 0.0, 4)
    else:
        losses, gh, _, _ = op(h, w, t, b, torch.ones(9), IGNORE, 0.0, 0.0, 0.0, 4)
        assert losses[2].isnan() and not losses[[0, 1, 3, 4, 5]].isnan().any() and gh[2].isnan().all()


def test_autocast_casts_like_f_linear():
    """Under bf16 autocast, float32 inputs reach the op in bfloat16 as they reach F.linear: the same loss and
    gradients as the op on bfloat16 copies, the gradients back in float32 (the inputs' dtype)."""
    h, w, t, b = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, *grads = _loss_and_grads(linear_cross_entropy, h, w, t, b, chunk_size=8)
    want, *want_grads = _loss_and_grads(linear_cross_entropy, *(x.bfloat16() for x in (h, w)), t, b.bfloat16(),
                                        chunk_size=8)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    for g, e in zip(grads, want_grads):
        assert g.dtype == torch.float32 and torch.equal(g, e.float())
