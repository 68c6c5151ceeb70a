"""Tolerances for comparing a backend's results with the reference, per storage dtype.

Backends compute in float32 like the reference but may contract multiply-adds into FMAs, sum
norms in a different order or precision, and so differ from it by rounding: about 1e-7 relative
in float32, which can flip a final rounding to bfloat16 / float16 by one unit in the last place
(ulp).  The tolerances below allow one ulp of the storage dtype (bfloat16: 2^-7 relative,
float16: 2^-10) and a small absolute slack for values near zero.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

#: dtype -> (atol, rtol) for ``|actual - expected| <= atol + rtol * |expected|``.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-5, 2.0**-7),
    torch.float16: (1e-5, 2.0**-10),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) for results stored in ``dtype``."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; known: {', '.join(str(d) for d in TOLERANCES)}")
    return TOLERANCES[dtype]


def assert_close(actual: Tensor, expected: Tensor, dtype: Optional[torch.dtype] = None, msg: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype`` (default: expected's dtype).

    Shapes must match; values are compared in float64 on the CPU, NaN equal to NaN.
    """
    atol, rtol = tolerance(dtype or expected.dtype)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda default: f"{msg}: {default}" if msg else default)


def assert_codes_close(actual: Tensor, expected: Tensor, max_fraction: float = 1e-2, msg: str = "") -> None:
    """Assert two int8 / uint8 code tensors are equal except at rounding ties.

    A value within rounding of a half-way point between two codes may round either way (a backend
    may multiply by the reciprocal scale where the reference divides), so codes may differ by one
    in at most ``max(2, max_fraction * numel)`` places.  Ties are not rare with bfloat16 gradients,
    whose few mantissa bits often put value / scale exactly half-way.
    """
    a = actual.detach().to("cpu", torch.int32)
    e = expected.detach().to("cpu", torch.int32)
    if a.shape != e.shape:
        raise AssertionError(f"{msg}: shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    diff = (a - e).abs()
    allowed = max(2, int(max_fraction * e.numel()))
    worst, count = int(diff.max()) if diff.numel() else 0, int((diff > 0).sum())
    if worst > 1 or count > allowed:
        raise AssertionError(f"{msg}: {count} of {e.numel()} codes differ (allowed {allowed}), by up to {worst} "
                             f"(allowed 1); first at flat index {int((diff > 0).flatten().nonzero()[0])}")


#: Attention: absolute slack added to "at most 2x PyTorch's own same-dtype error" (FlashAttention's rule),
#: for outputs and gradients whose torch error happens to be tiny.
ATTENTION_ATOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def assert_product_close(actual: Tensor, expected: Tensor, magnitude: Tensor, inner: int, dtype: torch.dtype,
                         msg: str = "") -> None:
    """Assert a matrix product computed in ``dtype`` matches its float64 value ``expected``.

    A dot product of ``inner`` terms summed in any order errs by at most about inner * u * sum |a_i b_i| (Higham,
    Accuracy and Stability of Numerical Algorithms, 2002, section 3.1; u = eps / 2): so the bound is
    inner * eps(dtype) * magnitude, where magnitude = |A| @ |B| in float64, plus a tiny absolute slack.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    bound = inner * torch.finfo(dtype).eps * magnitude.detach().to("cpu", torch.float64) + 1e-30
    excess = (a - e).abs() - bound
    if a.shape != e.shape or bool((excess > 0).any()) or bool(a.isnan().any()):
        worst = int(excess.flatten().argmax()) if a.shape == e.shape else -1
        raise AssertionError(f"{msg}: product differs beyond {inner} * eps({dtype}) * |A||B| (shapes "
                             f"{tuple(a.shape)} / {tuple(e.shape)}; worst flat index {worst})")


#: Quantization round trips: minimum SQNR in dB, 10 log10(sum x^2 / sum (x - dequantize(quantize(x)))^2), per
#: (format, granularity, data) on 256 x 256 float32 samples (seeded): "gaussian" N(0, 1), "student_t3" Student-t
#: with 3 degrees of freedom (heavy tails: per-tensor int8 loses most of its levels to the outliers).
#: Granularities: "tensor" one scale, "block256" blocks of 256, "row" axis=0 (256 scales of 256), "stochastic"
#: int8 block256 with stochastic rounding.  Measured values (README) minus about 1.5 dB.
QUANT_SQNR_DB: Dict[Tuple[str, str, str], float] = {
    ("int8", "tensor", "gaussian"): 39.0, ("int8", "tensor", "student_t3"): 19.0,
    ("int8", "block256", "gaussian"): 41.5, ("int8", "block256", "student_t3"): 33.5,
    ("int8", "row", "gaussian"): 41.5, ("int8", "row", "student_t3"): 33.5,
    ("int8", "stochastic", "gaussian"): 38.5, ("int8", "stochastic", "student_t3"): 30.5,
    ("fp8_e4m3", "tensor", "gaussian"): 30.0, ("fp8_e4m3", "tensor", "student_t3"): 30.5,
    ("fp8_e4m3", "block256", "gaussian"): 30.0, ("fp8_e4m3", "block256", "student_t3"): 31.5,
    ("fp8_e4m3", "row", "gaussian"): 30.0, ("fp8_e4m3", "row", "student_t3"): 31.5,
    ("fp8_e5m2", "tensor", "gaussian"): 24.0, ("fp8_e5m2", "tensor", "student_t3"): 24.5,
    ("fp8_e5m2", "block256", "gaussian"): 24.0, ("fp8_e5m2", "block256", "student_t3"): 25.5,
    ("fp8_e5m2", "row", "gaussian"): 24.0, ("fp8_e5m2", "row", "student_t3"): 25.5,
}


#: Fused linear cross-entropy (loss and gradients): normwise error max|x - x64| / max|x64| allowed on top of "at
#: most 2x PyTorch's own error in the same dtype" (F.linear in that dtype, cross-entropy in float32, the Hugging
#: Face recipe).  Chunked sums, a vectorized exp and float32 accumulation across chunks differ from it by
#: rounding only.
LINEAR_CROSS_ENTROPY_RTOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


#: Fused linear distillation loss (loss and student gradients): the same normwise allowance on top of "at most 2x
#: PyTorch's own error in the same dtype" (both F.linear in that dtype, the divergence in float32), for the same
#: reasons: chunked sums, vectorized exp / log1p and float32 accumulation across chunks differ by rounding only.
LINEAR_DISTILLATION_LOSS_RTOL: Dict[torch.dtype, float] = LINEAR_CROSS_ENTROPY_RTOL
