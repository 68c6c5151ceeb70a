"""GPU: PowerSGD kernels (``powersgd_p``, ``powersgd_q``, ``orthogonalize_``) of the "cuda" and "triton" backends on
CUDA float32 tensors against the float64 reference (products within the dot-product error bound, Gram-Schmidt to
float32 rounding, orthonormal columns; rank-deficient, zero and non-finite inputs; bitwise repeatable, which a
missing barrier between the Gram-Schmidt passes breaks), ``powersgd_compress`` against torch's QR, a matrix of
more than 2^31 elements (int64 offsets), and poisoned outputs."""
import pytest
import torch
from torch import Tensor

from pytrain.comm import orthogonalize_, powersgd_compress, powersgd_p, powersgd_q
from pytrain.ops import powersgd as powersgd_ops
from pytrain.testing import gpu
from pytrain.testing import powersgd as psgd_checks
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.tolerances import assert_close, assert_product_close

pytestmark = pytest.mark.gpu

IMPLS = ["cuda", "triton"]
#: (batch or None for 2-D, n, m, r): odd sizes, r = 1, r not a multiple of 4, r = min(n, m), tall and wide,
#: and larger matrices (a 4099 x 1023 gradient, a batch of 4).
CASES = [(None, 1, 1, 1), (None, 37, 29, 4), (3, 130, 67, 5), (2, 19, 300, 1), (None, 9, 9, 9), (None, 70, 257, 8),
         (None, 4099, 1023, 4), (4, 257, 513, 16), (None, 1000, 3001, 32)]


def _randn(batch, *shape, gen) -> Tensor:
    full = shape if batch is None else (batch,) + shape
    return torch.randn(full, generator=gen, dtype=torch.float64)


def check_products(impl, case, seed=1):
    batch, n, m, r = case
    gen = torch.Generator().manual_seed(seed)
    M, Q, P = _randn(batch, n, m, gen=gen).float(), _randn(batch, m, r, gen=gen).float(), \
        _randn(batch, n, r, gen=gen).float()
    got_p = powersgd_p(M.to(gpu.DEVICE), Q.to(gpu.DEVICE), impl=impl)
    got_q = powersgd_q(M.to(gpu.DEVICE), P.to(gpu.DEVICE), impl=impl)
    assert got_p.device.type == gpu.DEVICE and got_p.dtype == got_q.dtype == torch.float32
    assert got_p.shape == M.shape[:-1] + (r,) and got_q.shape == M.shape[:-2] + (m, r)
    M, Q, P = M.double(), Q.double(), P.double()  # the float32 inputs, exactly
    assert_product_close(got_p, powersgd_ops.powersgd_p_reference(M, Q),
                         powersgd_ops.powersgd_p_reference(M.abs(), Q.abs()), m, torch.float32,
                         msg=f"{impl} {case} P = M Q")
    assert_product_close(got_q, powersgd_ops.powersgd_q_reference(M, P),
                         powersgd_ops.powersgd_q_reference(M.abs(), P.abs()), n, torch.float32,
                         msg=f"{impl} {case} Q = M^T P")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_products_match_float64(impl, case):
    impl_or_skip("powersgd_p", impl, gpu.DEVICE)
    impl_or_skip("powersgd_q", impl, gpu.DEVICE)
    check_products(impl, case)


def _assert_orthonormal(P: Tensor, atol: float) -> None:
    P3 = P if P.dim() == 3 else P.unsqueeze(0)
    gram = P3.transpose(1, 2).double() @ P3.double()
    eye = torch.eye(P3.shape[2], dtype=torch.float64, device=P.device).expand_as(gram)
    torch.testing.assert_close(gram.cpu(), eye.cpu(), atol=atol, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_orthogonalize_matches_float64(impl, case):
    impl_or_skip("orthogonalize", impl, gpu.DEVICE)
    batch, n, _, r = case
    P = _randn(batch, n, r, gen=torch.Generator().manual_seed(2)).float()
    expected = P.double()
    powersgd_ops.orthogonalize_reference(expected, powersgd_ops.EPS)
    got = P.to(gpu.DEVICE)
    assert orthogonalize_(got, impl=impl) is got
    assert_close(got, expected, torch.float32, msg=f"{impl} {case} Gram-Schmidt")
    _assert_orthonormal(got, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rank_deficient_columns(impl):
    impl_or_skip("orthogonalize", impl, gpu.DEVICE)
    psgd_checks.check_deficient(impl, gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_stays_non_finite(impl):
    impl_or_skip("orthogonalize", impl, gpu.DEVICE)
    psgd_checks.check_non_finite(impl, gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_orthogonalize_repeatable(impl):
    """Ten runs on one input, bitwise equal: each pass reads what other threads wrote in the one before."""
    impl_or_skip("orthogonalize", impl, gpu.DEVICE)
    gen = torch.Generator().manual_seed(5)
    given = (torch.randn(4, 3001, 6, generator=gen, dtype=torch.float64)
             @ torch.randn(4, 6, 32, generator=gen, dtype=torch.float64)).float().to(gpu.DEVICE)
    given[:, :, :6] += torch.randn(4, 3001, 6, generator=gen).to(gpu.DEVICE)
    runs = []
    for _ in range(10):
        got = given.clone()
        orthogonalize_(got, impl=impl)
        runs.append(got)
    assert all(torch.equal(runs[0], run) for run in runs[1:]), f"{impl}: Gram-Schmidt is not repeatable (a race)"
    psgd_checks.assert_orthonormal_span(runs[0], given.cpu(), f"{impl} rank 6 of 32")


@pytest.mark.parametrize("impl", IMPLS)
def test_products_past_int32_offsets(impl):
    """One matrix of 2^31 + 2^20 elements (8.6 GB): its last rows need int64 offsets."""
    impl_or_skip("powersgd_p", impl, gpu.DEVICE)
    n, m = (1 << 21) + 1024, 1024
    if torch.cuda.mem_get_info()[0] < 10 * n * m:
        pytest.skip("needs ~10 GB of free GPU memory")
    M = torch.ones(n, m, device=gpu.DEVICE)
    M[-3:] = torch.arange(3 * m, device=gpu.DEVICE, dtype=torch.float32).view(3, m) / m
    Q = torch.ones(m, 2, device=gpu.DEVICE)
    P = powersgd_p(M, Q, impl=impl)
    expected = M[-3:].double() @ Q.double()
    torch.testing.assert_close(P[-3:].double(), expected, rtol=1e-6, atol=0)
    assert bool((P[:-3] == m).all()), f"{impl}: rows before the last three"
    Q_new = powersgd_q(M, torch.ones(n, 2, device=gpu.DEVICE), impl=impl)  # column sums of M
    expected = (n - 3) + M[-3:].double().sum(0)
    torch.testing.assert_close(Q_new[:, 0].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(Q_new[:, 1].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_agrees_with_torch_qr(impl):
    impl_or_skip("powersgd_p", impl, gpu.DEVICE)
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(2, 96, 80, generator=gen, dtype=torch.float64)
    Q = torch.randn(2, 80, 4, generator=gen, dtype=torch.float64)
    M32, Q32 = M.float(), Q.float()
    P, Q_new = powersgd_compress(M32.to(gpu.DEVICE), Q32.to(gpu.DEVICE), impl=impl)
    M, Q = M32.double(), Q32.double()
    P_torch = torch.linalg.qr(M @ Q).Q
    P_torch = P_torch * torch.sign((P.cpu().double() * P_torch).sum(dim=-2, keepdim=True))  # QR fixes signs only
    torch.testing.assert_close(P.cpu().double(), P_torch, atol=2e-5, rtol=0)
    torch.testing.assert_close(Q_new.cpu().double(), M.transpose(1, 2) @ P_torch, atol=2e-4, rtol=1e-5)
    _assert_orthonormal(P, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_outputs(impl):
    """P and Q allocated holding garbage (two patterns): every element must be written."""
    impl_or_skip("powersgd_p", impl, gpu.DEVICE)
    for byte in gpu.POISON_BYTES:
        for case in ((None, 37, 29, 4), (3, 130, 67, 5), (None, 4099, 1023, 4)):
            with gpu.poisoned(byte):
                check_products(impl, case, seed=4)
