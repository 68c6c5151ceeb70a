"""Triton twin of ``pytrain/ops/hash.py``: the lowbias32 integer hash (C. Wellons) on uint32, which
attention dropout and stochastic rounding draw their random bits from (multiplications wrap mod 2^32)."""
import triton
import triton.language as tl  # noqa: F401 (Triton's interpreter looks for it in a kernel's globals)


@triton.jit
def lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)
