"""pytrain.ops.linear_distillation_loss: loss and student gradients of every CPU-runnable backend against float64.

Each backend's normwise error against the float64 reference must be at most twice PyTorch's own error in the
same dtype (both F.linear in that dtype, the divergence in float32) plus ``LINEAR_DISTILLATION_LOSS_RTOL[dtype]``.
Triton runs through its interpreter in float32 / float16 (numpy has no bfloat16) on the options that cover its
kernel's branches (the interpreter is slow).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from pytrain.ops import linear_distillation_loss
from pytrain.testing.backends import CPU_IMPLS, backend_op, impl_or_skip
from pytrain.testing.linear_losses import (IGNORE, check_distillation, distillation_inputs, loss_and_grads,
                                           stock_distillation)

OP = "linear_distillation_loss"
N, HS, HT, V = 37, 12, 20, 1031  # odd V, N not a multiple of the chunk, student narrower than the teacher

OPTIONS = {
    "kl": {},
    "kl_t2": {"temperature": 2.0},
    "reverse_kl": {"kind": "reverse_kl", "temperature": 1.5},
    "jsd": {"kind": "jsd"},
    "jsd_beta": {"kind": "jsd", "beta": 0.1, "temperature": 3.0},
    "hard": {"kind": "jsd", "beta": 0.7, "hard_label_weight": 0.3, "temperature": 2.0},
    "hard_kl": {"hard_label_weight": 0.5, "temperature": 0.5},
    "no_target": {"kind": "reverse_kl", "target": None},
    "sum": {"kind": "jsd", "reduction": "sum", "hard_label_weight": 0.2},
    "none": {"kind": "kl", "reduction": "none", "hard_label_weight": 0.2, "temperature": 2.0},
}
TRITON_OPTIONS = ("kl_t2", "reverse_kl", "jsd_beta", "hard", "no_target", "none")  # every kernel branch


def _inputs(dtype, n=N, vocab=V, seed=0):
    return distillation_inputs(dtype, n, HS, HT, vocab, seed)


def _loss_and_grads(fn, hs, ws, ht, wt, t, **kw):
    return loss_and_grads(fn, (hs, ws, ht, wt, t), (0, 1), **kw)


def _check_against_float64(impl, dtype, chunk_size=8, options=None, n=N, vocab=V):
    check_distillation(impl, dtype, n=n, student=HS, teacher=HT, vocab=vocab, chunk_size=chunk_size,
                       options=options)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The Triton interpreter runs float32 / float16 (numpy has no bfloat16) on the options covering its kernel's branches.
CASES = [(impl, dtype, option) for impl in CPU_IMPLS for dtype in DTYPES for option in OPTIONS
         if impl != "triton" or (dtype != "bf16" and option in TRITON_OPTIONS)]


@pytest.mark.parametrize("impl, dtype, option", CASES, ids=["-".join(case) for case in CASES])
def test_matches_float64(impl, dtype, option):
    impl_or_skip(OP, impl)
    _check_against_float64(impl, DTYPES[dtype], options=OPTIONS[option])


@pytest.mark.parametrize("option, chunk_size", [("hard", 1), ("jsd_beta", 5), ("reverse_kl", 36), ("hard", 37),
                                                ("none", 100)])
def test_chunk_boundaries(option, chunk_size):
    """Chunks of 1 row, uneven chunks, a last chunk of one row, one chunk of all N and one larger than N."""
    impl_or_skip(OP, "cpu")
    _check_against_float64("cpu", torch.float32, chunk_size=chunk_size, options=OPTIONS[option])


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_tiny_vocab(impl):
    impl_or_skip(OP, impl)
    _check_against_float64(impl, torch.float32, chunk_size=4, n=9, vocab=3, options=OPTIONS["hard"])


def test_reference_is_torch_kl_div():
    """kind "kl" without a target is T^2 F.kl_div(log_softmax(s / T), log_softmax(t / T), "batchmean");
    hard_label_weight mixes in F.cross_entropy with its ignore_index rule."""
    hs, ws, ht, wt, t = (x.double() if x.is_floating_point() else x for x in _inputs(torch.float32))
    s, te = hs @ ws.t(), ht @ wt.t()
    got = linear_distillation_loss(hs, ws, ht, wt, temperature=2.0, impl="reference")
    want = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(te / 2, -1), reduction="batchmean",
                          log_target=True)
    torch.testing.assert_close(got, want)
    mixed = linear_distillation_loss(hs, ws, ht, wt, t, hard_label_weight=1.0, impl="reference")
    torch.testing.assert_close(mixed, F.cross_entropy(s, t, ignore_index=IGNORE))


def test_jsd_ends_are_forward_and_reverse_kl():
    """Generalised JSD(b) / b -> KL(p || q) as b -> 0 and / (1 - b) -> KL(q || p) as b -> 1 (Agarwal et al.)."""
    args = [x.double() for x in _inputs(torch.float32)[:4]]
    kl = linear_distillation_loss(*args, impl="reference")
    rkl = linear_distillation_loss(*args, kind="reverse_kl", impl="reference")
    b = 1e-8  # the next term is O(b chi^2(p || q)): chi^2 ~ 1e3 on these logits
    lo = linear_distillation_loss(*args, kind="jsd", beta=b, impl="reference") / b
    hi = linear_distillation_loss(*args, kind="jsd", beta=1 - b, impl="reference") / b
    torch.testing.assert_close(lo, kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(hi, rkl, rtol=1e-5, atol=0)


@pytest.mark.parametrize("option", ["kl_t2", "reverse_kl", "jsd_beta", "hard", "none"])
def test_reference_gradients_are_autograd_of_torch(option):
    """The reference's gradient formulas equal autograd of F.kl_div / F.cross_entropy, in float64."""
    hs, ws, ht, wt, t = (x.double() if x.is_floating_point() else x for x in _inputs(torch.float32))
    options = dict(OPTIONS[option], reduction="none")
    expected = _loss_and_grads(stock_distillation, hs, ws, ht, wt, t, **options)
    got = _loss_and_grads(linear_distillation_loss, hs, ws, ht, wt, t, impl="reference", **options)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_teacher_gets_no_gradient_and_equal_models_have_zero_loss(impl):
    impl_or_skip(OP, impl)
    hs, ws, _, _, t = _inputs(torch.float32)
    teacher_h, teacher_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    student_h = hs.clone().requires_grad_()
    for kind in ("kl", "reverse_kl", "jsd"):
        loss = linear_distillation_loss(student_h, ws, teacher_h, teacher_w, t, kind=kind, temperature=2.0, impl=impl)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-5, kind
        assert teacher_h.grad is None and teacher_w.grad is None
        assert float(student_h.grad.abs().max()) < 1e-5, kind
        student_h.grad = None


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_all_ignored_mean_is_nan_with_zero_grads_like_torch(impl):
    impl_or_skip(OP, impl)
    hs, ws, ht, wt, _ = _inputs(torch.float32)
    t = torch.full((N,), IGNORE)
    loss, gh, gw = _loss_and_grads(linear_distillation_loss, hs, ws, ht, wt, t, impl=impl, hard_label_weight=0.5)
    assert math.isnan(float(loss))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_opcheck(impl):
    impl_or_skip(OP, impl)
    name = {"cpu": OP, "reference": OP + "_reference", "triton": OP + "_triton"}[impl]
    hs, ws, ht, wt, t = _inputs(torch.float32, n=9, vocab=13)
    op = getattr(torch.ops.pytrain, name).default
    torch.library.opcheck(op, (hs, ws, ht, wt, t, torch.rand(9), "jsd", 2.0, 0.3, 0.25, IGNORE, 4))
    torch.library.opcheck(op, (hs, ws, ht, wt, None, None, "reverse_kl", 1.0, 0.5, 0.0, IGNORE, 4))


@pytest.mark.parametrize("impl", ["cpu", "triton"])
def test_kernel_rejects_or_poisons_out_of_range_target(impl):
    """The kernels themselves (reached without the public function's host check): CPU raises, Triton gives NaN."""
    impl_or_skip(OP, impl)
    hs, ws, ht, wt, t = _inputs(torch.float32, n=9, vocab=7)
    t[2] = 7
    op = backend_op(OP, impl)
    if impl == "cpu":
        with pytest.raises(RuntimeError, match=r"target\[2\] = 7 is outside \[0, 7\)"):
            op(hs, ws, ht, wt, t, None, "kl", 1.0, 0.5, 0.0, IGNORE, 4)
    else:
        losses, gh, _ = op(hs, ws, ht, wt, t, torch.ones(9), "kl", 1.0, 0.5, 0.0, IGNORE, 4)
        assert losses[2].isnan() and not losses[[0, 1, 4, 5]].isnan().any() and gh[2].isnan().all()


def test_module_flattens_leading_dims_like_the_function():
    from pytrain.nn import LinearDistillationLoss

    hs, ws, ht, wt, t = _inputs(torch.float32, n=12, vocab=29)
    options = {"kind": "jsd", "beta": 0.3, "temperature": 2.0, "hard_label_weight": 0.25}
    module = LinearDistillationLoss(**options)
    torch.testing.assert_close(module(hs.view(3, 4, HS), ws, ht.view(3, 4, HT), wt, t.view(3, 4)),
                               linear_distillation_loss(hs, ws, ht, wt, t, **options))
    per_token = LinearDistillationLoss(reduction="none")(hs.view(3, 4, HS), ws, ht.view(3, 4, HT), wt)
    assert per_token.shape == (3, 4)
    with pytest.raises(ValueError, match="leading dims"):
        module(hs.view(3, 4, HS), ws, ht.view(4, 3, HT), wt, t.view(3, 4))
    with pytest.raises(ValueError, match="kind"):
        LinearDistillationLoss(kind="forward")


def test_autocast_casts_like_f_linear():
    """Under bf16 autocast, float32 student and teacher inputs reach the op in bfloat16, as they reach F.linear:
    the same loss and student gradients as the op on bfloat16 copies, the gradients back in float32."""
    hs, ws, ht, wt, t = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, *grads = _loss_and_grads(linear_distillation_loss, hs, ws, ht, wt, t, temperature=2.0)
    want, *want_grads = _loss_and_grads(linear_distillation_loss, *(x.bfloat16() for x in (hs, ws, ht, wt)), t,
                                        temperature=2.0)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    for g, e in zip(grads, want_grads):
        assert g.dtype == torch.float32 and torch.equal(g, e.float())
