"""The lowbias32 integer hash (C. Wellons) that makes attention dropout and stochastic rounding
reproducible: a stateless function of an element's coordinates and the seed, identical in every backend
(Triton twin: ``kernels/hash.py``; C++: ``csrc/cpu`` and ``csrc/cuda``), so a backward pass regenerates
its forward's random bits from the seed alone and tests compare backends exactly.

    x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16     (mod 2^32)
"""
from __future__ import annotations

from torch import Tensor

MASK32 = 0xFFFFFFFF


def lowbias32(x: Tensor) -> Tensor:
    """The lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)
