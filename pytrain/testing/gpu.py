"""Helpers of the GPU tests (``tests/gpu``): the device they run on and poisoned outputs.

Poisoning: a kernel that leaves elements of an output unwritten returns whatever the memory held before.
``poisoned(byte)`` makes that memory a known garbage byte pattern (0xFF: NaN in every float format, -1 in int8,
255 in uint8) for the duration of a call, in two ways:

* the Triton launchers (``pytrain.kernels.<name>``) allocate through ``torch.empty`` / ``torch.empty_like``:
  inside the context those names, looked up on the launcher module's ``torch``, return tensors filled with
  ``byte`` (intermediate buffers too: per-block partial sums, counts, delta);
* the CUDA C++ kernels allocate through ``at::empty`` and the caching allocator: the allocator's cache is
  emptied, then refilled with freed blocks holding ``byte`` (small and large pool), so that the next
  allocations most likely reuse them.  (Best effort: an allocation may still land in other free memory.)

Call an op twice, poisoned with two different bytes (``POISON_BYTES``), and compare both results with the
reference: an unwritten element cannot match the reference in both runs.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

#: The device the GPU tests run on.
DEVICE = "cuda"
#: Two garbage patterns: 0xFF (NaN in float32 / float16 / bfloat16 / fp8, -1 in int8) and 0x55 (85.3 in
#: float16, 1.5e13 in float32, 85 in int8).
POISON_BYTES = (0xFF, 0x55)
#: Triton launcher modules whose ``torch.empty`` / ``torch.empty_like`` allocate outputs and buffers.
LAUNCHER_MODULES = ("adamw", "lars", "lamb", "global_norm", "multi_tensor", "quantize", "topk", "powersgd",
                    "attention", "linear_chunks", "linear_cross_entropy", "linear_distillation_loss")


def fill_bytes(t: Tensor, byte: int) -> Tensor:
    """Fill every byte of contiguous ``t`` with ``byte``; returns ``t``."""
    if t.numel():
        t.reshape(-1).view(torch.uint8).fill_(byte)
    return t


class _PoisonedTorch:
    """Stands in for the ``torch`` module inside a launcher module: everything is torch's, except that
    ``empty`` and ``empty_like`` return tensors whose bytes are all ``byte``."""

    def __init__(self, byte: int):
        self._byte = byte

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, **kwargs) -> Tensor:
        return fill_bytes(torch.empty(*args, **kwargs), self._byte)

    def empty_like(self, *args, **kwargs) -> Tensor:
        return fill_bytes(torch.empty_like(*args, **kwargs), self._byte)


def poison_cuda_cache(byte: int, device: Optional[str] = None, large_bytes: int = 256 << 20) -> None:
    """Leave the caching allocator's free memory on ``device`` (default ``DEVICE``) filled with ``byte`` (see the
    module docstring)."""
    device = device or DEVICE
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    # 1 MiB blocks are the largest of the small pool (2 MiB segments); one large block for the large pool.
    blocks = [torch.empty(1 << 20, dtype=torch.uint8, device=device) for _ in range(16)]
    blocks.append(torch.empty(large_bytes, dtype=torch.uint8, device=device))
    for b in blocks:
        b.fill_(byte)
    torch.cuda.synchronize(device)
    del blocks


@contextlib.contextmanager
def poisoned(byte: int, modules: Sequence[str] = LAUNCHER_MODULES, device: Optional[str] = None) -> Iterator[None]:
    """Inside: Triton launchers allocate ``byte``-filled tensors, and the CUDA cache of ``device`` (default
    ``DEVICE``) holds ``byte``-filled memory."""
    device = device or DEVICE
    mods = [importlib.import_module(f"pytrain.kernels.{name}") for name in modules]
    mods = [m for m in mods if hasattr(m, "torch")]  # (a launcher allocating nothing may not import torch)
    saved = [m.torch for m in mods]
    try:
        for m in mods:
            m.torch = _PoisonedTorch(byte)
        if torch.device(device).type == "cuda":
            poison_cuda_cache(byte, device)
        yield
    finally:
        for m, t in zip(mods, saved):
            m.torch = t
