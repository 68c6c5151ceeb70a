"""Multi-tensor launches: one Triton launch covers every tensor of an op's tensor lists.

Used by the fused optimizer kernels (adamw.py, lars.py, lamb.py, global_norm.py; their maths is in
pytrain/ops/<op>.py).  An optimizer step touches hundreds of tensors of very different sizes;
one launch per tensor would cost more in launch overhead than the memory traffic of small tensors.

Host side, ``table(lists, block)`` describes the lists in one int64 device buffer, views of which are:
  addrs  (L, T)   data_ptr() of tensor t of list l (0 for an empty list, whose row the kernel never reads)
  numels (T,)     elements of tensor t of lists[0] (the params; grads and states are alike)
  blocks (B, 2)   for program b: the tensor it works on and the index of its ``block``-element block in it
  bounds (T + 1,) first program of each tensor (bounds[T] = B): per-block partial sums of tensor t are
                  partials[bounds[t]:bounds[t + 1]], reduced by ``segment_sums`` in a fixed order
  whole  (2,)     [0, B]: the one segment of all partials (a global reduction)
It is built with one host-to-device copy (asynchronous: no host sync) and cached by content (addresses,
numels, block size, stream; the stream because the copy is ordered only on its own): the table is a pure
function of that key, so a hit is valid even after memory reuse, and repeated optimizer steps over the
same tensors copy nothing.

Device side, ``tensor_ptr`` loads an address and casts it to a typed pointer (int64 -> pointer casts work
compiled and under TRITON_INTERPRET=1 with CPU tensors, checked with Triton 3.8), and ``block_coords``
gives a program's (tensor, first element, numel).  Two details keep the accesses 128-bit wide on GPUs:
  * a mask against a numel loaded from memory defeats vectorization, so kernels run their body unmasked
    on full blocks and masked only on the last block of each tensor (``MASKED`` constexpr of ``load``);
  * the compiler knows nothing about a loaded address, so when every address of the table is a multiple
    of 16 bytes (tensors from the caching allocator are) ``aligned`` is set and kernels pass it on as the
    ``ALIGNED`` constexpr, which states it with tl.multiple_of.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

ALIGN_BYTES = tl.constexpr(16)  # alignment that lets the compiler use 128-bit accesses

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
}

# segment_sums: partials read per loop iteration of one program.
SEGMENT_CONFIG = {"CHUNK": 1024, "num_warps": 4}


def tl_dtype(tensors: Sequence[Tensor]):
    """Triton element type of a non-empty list's tensors."""
    return _TL_DTYPES[tensors[0].dtype]


@dataclass(frozen=True)
class Table:
    """Device description of an op's tensor lists (see the module docstring)."""

    addrs: Tensor
    numels: Tensor
    blocks: Tensor
    bounds: Tensor
    whole: Tensor
    block: int
    n_tensors: int
    n_blocks: int
    aligned: bool


def table(lists: Sequence[Sequence[Tensor]], block: int) -> Table:
    """The table for ``lists`` (lists[0] non-empty; the others empty or one tensor per lists[0] tensor)."""
    first = lists[0]
    device = first[0].device
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    addrs = tuple(tuple([t.data_ptr() for t in tensors]) for tensors in lists)
    return _build(device, stream, block, tuple([t.numel() for t in first]), addrs)


@functools.lru_cache(maxsize=32)
def _build(device: torch.device, stream: Optional[int], block: int, numels: tuple, addrs: tuple) -> Table:
    # numpy rather than torch on the host: tiny torch CPU ops can stall on a busy OpenMP pool.
    n_tensors = len(numels)
    rows = np.array([row if row else (0,) * n_tensors for row in addrs], dtype=np.int64).reshape(-1)
    sizes = np.array(numels, dtype=np.int64)
    counts = (sizes + block - 1) // block
    bounds = np.concatenate([[0], np.cumsum(counts)])
    n_blocks = int(bounds[-1])
    tensor_of_block = np.repeat(np.arange(n_tensors), counts)
    blocks = np.stack([tensor_of_block, np.arange(n_blocks) - bounds[tensor_of_block]], axis=1).reshape(-1)
    parts = [rows, sizes, blocks, bounds, np.array([0, n_blocks])]
    # One copy; from pageable memory a non_blocking copy is staged by the driver, so no stream sync.
    buf = torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device, non_blocking=True)
    views = torch.split(buf, [p.size for p in parts])
    return Table(addrs=views[0], numels=views[1], blocks=views[2], bounds=views[3], whole=views[4],
                 block=block, n_tensors=n_tensors, n_blocks=n_blocks,
                 aligned=bool(np.all(rows % ALIGN_BYTES.value == 0)))


@triton.jit
def block_coords(blocks, numels, BLOCK: tl.constexpr):
    """(tensor index, first element, tensor numel) of this program's block."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1) * BLOCK
    return t, start, tl.load(numels + t)


@triton.jit
def tensor_ptr(addrs, n_tensors, row: tl.constexpr, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to tensor ``t`` of list ``row`` of the table."""
    ptr = tl.load(addrs + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, ALIGN_BYTES)
    return ptr


@triton.jit
def load(ptr, offs, n, MASKED: tl.constexpr):
    """Elements ``offs`` of a tensor of ``n`` elements as float32 (0 past the end when MASKED)."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def store(ptr, offs, n, x, MASKED: tl.constexpr):
    """Store float32 ``x`` rounded to nearest even in the tensor's dtype (only below ``n`` when MASKED)."""
    x = x.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, x, mask=offs < n)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def _segment_sum_kernel(partials, n_partials, bounds, out, n_segments, SQRT: tl.constexpr, CHUNK: tl.constexpr):
    """out[k, s] = sum of partials[k, bounds[s]:bounds[s + 1]] (sqrt'ed if SQRT), always in the same order,
    accumulated in the partials' dtype and rounded once to float32."""
    seg = tl.program_id(0)
    k = tl.program_id(1)
    lo = tl.load(bounds + seg)
    hi = tl.load(bounds + seg + 1)
    src = partials + k * n_partials
    acc = tl.zeros([CHUNK], dtype=partials.dtype.element_ty)
    for i in range(lo, hi, CHUNK):
        offs = i + tl.arange(0, CHUNK)
        acc += tl.load(src + offs, mask=offs < hi, other=0.0)
    total = tl.sum(acc, axis=0)
    if SQRT:
        if partials.dtype.element_ty == tl.float64:
            total = tl.sqrt(total)  # float64 square roots are IEEE-rounded
        else:
            total = tl.sqrt_rn(total)  # float32 tl.sqrt may be the approximate one
    tl.store(out + k * n_segments + seg, total.to(tl.float32))


def segment_sums(partials: Tensor, bounds: Tensor, n_segments: int, sqrt: bool = False) -> Tensor:
    """Sum each row of ``partials`` (K, P) float32 or float64 over the segments ``bounds`` (n_segments + 1
    entries) -> (K, n_segments) float32, deterministic; square-rooted (before rounding to float32) if ``sqrt``."""
    k, n = partials.shape
    out = torch.empty((k, n_segments), dtype=torch.float32, device=partials.device)
    _segment_sum_kernel[(n_segments, k)](partials, n, bounds, out, n_segments, SQRT=sqrt, **SEGMENT_CONFIG)
    return out
