"""PowerSGD kernels (powersgd_p, powersgd_q, orthogonalize_, powersgd_compress) against the float64 reference
(pytrain/ops/powersgd.py) and torch's own ops (matmul + torch.linalg.qr, equal up to column signs)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pytrain.comm import orthogonalize_, powersgd_compress, powersgd_p, powersgd_q
from pytrain.ops import NoImplementationError
from pytrain.ops import powersgd as powersgd_ops
from pytrain.testing import powersgd as psgd_checks
from pytrain.testing.backends import impl_or_skip, triton_device
from pytrain.testing.tolerances import assert_close, assert_product_close

IMPLS = ("cpu", "cuda", "triton", "reference")
#: (batch or None for 2-D, n, m, r): odd sizes, r = 1, r not a multiple of 4, r = min(n, m), tall and wide
CASES = [(None, 1, 1, 1), (None, 37, 29, 4), (3, 130, 67, 5), (2, 19, 300, 1), (None, 9, 9, 9), (None, 70, 257, 8)]


def _device(op: str, impl: str) -> str:
    device = "cuda" if impl == "cuda" else triton_device() if impl == "triton" else "cpu"
    impl_or_skip(op, impl, device)
    return device


def _randn(batch, *shape, device="cpu", gen=None) -> Tensor:
    full = shape if batch is None else (batch,) + shape
    return torch.randn(full, generator=gen, dtype=torch.float64).to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_products_match_float64(impl, case):
    batch, n, m, r = case
    device = _device("powersgd_p", impl)
    gen = torch.Generator().manual_seed(1)
    M, Q, P = _randn(batch, n, m, gen=gen), _randn(batch, m, r, gen=gen), _randn(batch, n, r, gen=gen)
    M32, Q32, P32 = M.float().to(device), Q.float().to(device), P.float().to(device)
    got_p = powersgd_p(M32, Q32, impl=impl)
    got_q = powersgd_q(M32, P32, impl=impl)
    assert got_p.shape == M.shape[:-1] + (r,) and got_q.shape == M.shape[:-2] + (m, r)
    assert got_p.dtype == got_q.dtype == torch.float32
    M, Q, P = M32.double().cpu(), Q32.double().cpu(), P32.double().cpu()  # the float32 inputs, exactly
    assert_product_close(got_p, powersgd_ops.powersgd_p_reference(M, Q), powersgd_ops.powersgd_p_reference(M.abs(), Q.abs()), m,
                         torch.float32, msg=f"{impl} P = M Q")
    assert_product_close(got_q, powersgd_ops.powersgd_q_reference(M, P), powersgd_ops.powersgd_q_reference(M.abs(), P.abs()), n,
                         torch.float32, msg=f"{impl} Q = M^T P")


def _assert_orthonormal(P: Tensor, atol: float) -> None:
    P3 = P if P.dim() == 3 else P.unsqueeze(0)
    gram = P3.transpose(1, 2).double() @ P3.double()
    eye = torch.eye(P3.shape[2], dtype=torch.float64).expand_as(gram)
    torch.testing.assert_close(gram.cpu(), eye, atol=atol, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_orthogonalize_matches_float64(impl, case):
    batch, n, _, r = case
    device = _device("orthogonalize", impl)
    P = _randn(batch, n, r, gen=torch.Generator().manual_seed(2)).float()
    expected = P.double()
    powersgd_ops.orthogonalize_reference(expected, powersgd_ops.EPS)
    got = P.to(device)
    assert orthogonalize_(got, impl=impl) is got
    assert_close(got, expected, torch.float32, msg=f"{impl} Gram-Schmidt")
    _assert_orthonormal(got, 1e-5)


def _sign_match(ours: Tensor, theirs: Tensor) -> Tensor:
    """``theirs`` with each column's sign flipped to agree with ``ours`` (QR fixes columns up to sign)."""
    signs = torch.sign((ours * theirs).sum(dim=-2, keepdim=True))
    return theirs * signs


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_agrees_with_torch_qr(impl):
    device = _device("powersgd_p", impl)
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(2, 96, 80, generator=gen).to(device)
    Q = torch.randn(2, 80, 4, generator=gen).to(device)
    P, Q_new = powersgd_compress(M, Q, impl=impl)
    P_torch = torch.linalg.qr(M.double() @ Q.double()).Q
    P_torch = _sign_match(P.double(), P_torch)
    torch.testing.assert_close(P.double(), P_torch, atol=2e-5, rtol=0)
    torch.testing.assert_close(Q_new.double(), M.double().transpose(1, 2) @ P_torch, atol=2e-4, rtol=1e-5)
    _assert_orthonormal(P, 1e-5)


def test_warm_start_recovers_low_rank():
    """Subspace iteration: reusing Q_new step after step makes P Q^T converge to a rank-r M."""
    gen = torch.Generator().manual_seed(4)
    M = torch.randn(200, 4, generator=gen) @ torch.randn(4, 150, generator=gen)
    Q = torch.randn(150, 4, generator=gen)
    errors = []
    for _ in range(3):
        P, Q = powersgd_compress(M, Q)
        errors.append(float((P @ Q.t() - M).norm() / M.norm()))
    assert errors[-1] < 1e-5, errors


@pytest.mark.parametrize("impl", IMPLS)
def test_rank_deficient_columns(impl):
    """Zero, dependent and low-rank inputs: orthonormal columns spanning the input (one-pass Gram-Schmidt left
    normalised rounding noise there, and P P^T was no projector), the reference's replacement columns."""
    psgd_checks.check_deficient(impl, _device("orthogonalize", impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_stays_non_finite(impl):
    psgd_checks.check_non_finite(impl, _device("orthogonalize", impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_exact_for_low_rank(impl):
    """M of rank 2 < r = 4: one compression step reproduces M to float32 rounding (torch's hook, with QR, does)."""
    device = _device("powersgd_p", impl)
    gen = torch.Generator().manual_seed(6)
    M = (torch.randn(2, 64, 2, generator=gen) @ torch.randn(2, 2, 48, generator=gen)).to(device)
    P, Q_new = powersgd_compress(M, torch.randn(2, 48, 4, generator=gen).to(device), impl=impl)
    rel = float((P @ Q_new.transpose(1, 2) - M).norm() / M.norm())
    assert rel <= 1e-6, f"{impl}: relative error {rel:.2e} of P Q^T for a rank-2 M at rank 4"


def test_nan_propagates():
    M = torch.randn(20, 10)
    M[3, 4] = float("nan")
    P, Q = powersgd_compress(M, torch.randn(10, 2))
    assert P.isnan().any() and Q.isnan().any(), "a NaN gradient must not come out finite"


def test_other_dtypes_use_the_reference():
    M = torch.randn(30, 20, dtype=torch.bfloat16)
    Q = torch.randn(20, 2, dtype=torch.bfloat16)
    P, Q_new = powersgd_compress(M, Q)
    assert P.dtype == Q_new.dtype == torch.bfloat16
    with pytest.raises(NoImplementationError, match="float32 only"):
        powersgd_p(M, Q, impl="cpu")
    P64, _ = powersgd_compress(M.double(), Q.double())
    _assert_orthonormal(P64, 1e-9)


@pytest.mark.parametrize("call, match", [
    (lambda: powersgd_p(torch.randn(4, 5), torch.randn(4, 2)), "needs 5 rows"),
    (lambda: powersgd_q(torch.randn(4, 5), torch.randn(5, 2)), "needs 4 rows"),
    (lambda: powersgd_p(torch.randn(4, 5), torch.randn(5, 6)), "rank 6 exceeds"),
    (lambda: powersgd_p(torch.randn(2, 4, 5), torch.randn(3, 5, 2)), "same batch"),
    (lambda: powersgd_p(torch.randn(4, 5), torch.randn(1, 5, 2)), "same batch"),
    (lambda: powersgd_p(torch.randn(5), torch.randn(5, 2)), "2-D or 3-D"),
    (lambda: powersgd_p(torch.randn(5, 4).t(), torch.randn(5, 2)), "contiguous"),
    (lambda: powersgd_p(torch.randn(0, 5), torch.randn(5, 1)), "empty"),
    (lambda: powersgd_p(torch.ones(4, 5, dtype=torch.int32), torch.ones(5, 2, dtype=torch.int32)), "floating"),
    (lambda: powersgd_p(torch.randn(4, 5), torch.randn(5, 2, dtype=torch.float64)), "float64"),
    (lambda: orthogonalize_(torch.randn(3, 5)), "more columns than rows"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps=-1.0), "eps must be"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps=math.inf), "eps must be finite and in"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps=math.nan), "eps must be finite and in"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps=1.0), r"in \[0, 1\)"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps=True), "eps must be a float"),
    (lambda: orthogonalize_(torch.randn(5, 3), eps="1e-6"), "eps must be a float"),
])
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_cpu_kernel_checks():
    impl_or_skip("powersgd_p", "cpu")
    with pytest.raises(RuntimeError, match="supports float32"):
        torch.ops.pytrain.powersgd_p(torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.pytrain.powersgd_q(torch.randn(4, 5), torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.pytrain.orthogonalize(torch.randn(4, 5).t(), 1e-8)


OPCHECK_ARGS = {
    "powersgd_p": lambda: (torch.randn(2, 9, 7), torch.randn(2, 7, 3)),
    "powersgd_q": lambda: (torch.randn(9, 7), torch.randn(9, 3)),
    "orthogonalize": lambda: (torch.randn(2, 9, 3), 1e-8),
}


@pytest.mark.parametrize("impl", ("cpu", "triton", "reference"))
@pytest.mark.parametrize("op", list(OPCHECK_ARGS))
def test_opcheck(op, impl):
    impl_or_skip(op, impl)
    name = op if impl == "cpu" else f"{op}_{impl}"
    torch.library.opcheck(getattr(torch.ops.pytrain, name).default, OPCHECK_ARGS[op]())
