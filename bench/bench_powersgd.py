"""PowerSGD compression step, rank 4, on one 4096 x 4096 fp32 gradient: pytrain.comm.powersgd_compress against
the same step written with torch ops, both in one process on the same inputs (Q warm-started: the same Q each call).

torch baseline:   P = M @ Q;  P = torch.linalg.qr(P).Q;  Q_new = M.T @ P
pytrain:          powersgd_compress(M, Q)  (powersgd_p, fused Gram-Schmidt, powersgd_q)
The two agree up to the signs of P's columns (Gram-Schmidt makes R's diagonal positive, Householder QR may not).

Byte model: both skinny products must read M once each: 2 * 4 n m bytes (P, Q and the orthogonalisation touch
n r + m r floats, negligible).  Target: >= 3x faster than the torch step (ratio <= 0.33x).
"""
import pytest
import torch

from pytrain.comm import powersgd_compress

PROVIDERS = ("torch", "pytrain")
N = M_COLS = 4096
RANK = 4
BYTES = 2 * 4 * N * M_COLS
TARGET = "ratio <= 0.33x (>= 3x faster than matmul + torch.linalg.qr)"


@pytest.fixture(scope="module")
def data(bench_device):
    gen = torch.Generator(bench_device).manual_seed(0)
    return (torch.randn(N, M_COLS, device=bench_device, generator=gen),
            torch.randn(M_COLS, RANK, device=bench_device, generator=gen))


def torch_step(M, Q):
    P = torch.linalg.qr(M @ Q).Q
    return P, M.T @ P


def test_powersgd(provider, impl, data, measure):
    M, Q = data
    step = (lambda: torch_step(M, Q)) if provider == "torch" else (lambda: powersgd_compress(M, Q, impl=impl))
    measure(step, case=f"powersgd compress rank {RANK}, {N}x{M_COLS} fp32", provider=provider, bytes_moved=BYTES,
            op="powersgd_p", impl=impl, baseline="M @ Q, torch.linalg.qr, M.T @ P", target=TARGET)
