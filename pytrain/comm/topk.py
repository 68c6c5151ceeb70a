"""Top-k gradient sparsification: ``topk(x, ratio, exact=False) -> (values, indices)``.

k = max(1, round(ratio * x.numel())), with Python's ``round`` (half to even: ratio 0.5 of 5 elements gives 2).
The magnitude order puts NaN above every number, as ``torch.topk`` does: NaN entries are always selected first,
so a NaN gradient reaches the other ranks instead of silently vanishing.

Both modes share one memory-bound kernel, ``topk_filter`` (all entries with |x| >= t, see
``pytrain/ops/topk.py``), and estimate t from a random sample of |x| as Deep Gradient Compression
(Lin et al. 2018) does:

1. Sample s = 32752 entries, as 2047 runs of 16 consecutive entries starting at uniformly random places
   (the ``generator`` argument, else pytrain's own generator of x's device, seeded with SEED: the caller's RNG
   stream is untouched; ``TopKState`` passes its own, saved in its state_dict), and take t as the sample's
   ceil(MARGIN * k * s / numel)-th largest |x|: aimed a little low, so the filter keeps about MARGIN * k
   entries (relative spread about 1 / sqrt(k * s / numel): 5.5% at ratio 0.01).
2. Filter.  Fewer than k kept: take the sample entry of twice the rank and filter again (rank past the
   sample: t = 0, every entry); so the kept set always holds an exact top-k.
3. Refine: exact mode, or more than ceil(MAX_EXCESS * k) kept, picks the top k of the kept entries with
   ``torch.topk`` (the kept set is small: ~1.1% of x for ratio 0.01).

So approximate mode returns between k and ceil(MAX_EXCESS * k) entries (about MARGIN * k typically), a superset
of an exact top-k: it captures at least all of the exact top-k's squared L2 mass.  Exact mode returns the same
set as ``torch.topk(x.abs().flatten(), k)`` (ties at the k-th magnitude: any valid choice).  Tensors of at most
``SMALL`` entries go straight to ``torch.topk``.  Output order: ascending indices when the filter's result is
returned as is (approximate mode, usually), otherwise unspecified.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..ops.registry import FLOAT_DTYPES
from ..ops.topk import topk_exact, topk_filter

RUN = 16  # the threshold sample: runs of RUN consecutive entries (one 64-byte cache line of float32) ...
SAMPLE = 2047 * RUN  # ... 32752 entries: below ATen's parallel grain (32768), so the sampling ops run serially
MARGIN = 1.12  # aim the threshold at MARGIN * k kept entries (over-select a little rather than refine)
MAX_EXCESS = 1.25  # approximate mode refines to exactly k above this many kept entries (times k)
SMALL = 1 << 15  # at most this many entries: plain torch.topk
SEED = 0x70CC  # seed of pytrain's sampling generators (one per device)
DTYPES = FLOAT_DTYPES + (torch.float64,)

_generators: Dict[torch.device, torch.Generator] = {}


def check_ratio(where: str, ratio) -> float:
    """``ratio`` as a float in (0, 1]: TypeError for a non-number (a bool included), ValueError out of range."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{where}: ratio must be a float in (0, 1], got {type(ratio).__name__} {ratio!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{where}: ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def topk_k(numel: int, ratio: float) -> int:
    """The k that ``topk`` selects for ``numel`` entries: max(1, round(ratio * numel))."""
    return max(1, round(check_ratio("pytrain.comm.topk_k", ratio) * numel))


def _check(x: Tensor, ratio: float, generator: Optional[torch.Generator]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"pytrain.comm.topk: x must be a Tensor, got {type(x).__name__}")
    check_ratio("pytrain.comm.topk", ratio)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device != x.device):
        raise TypeError(f"pytrain.comm.topk: generator must be a torch.Generator on {x.device}, got "
                        f"{generator.device if isinstance(generator, torch.Generator) else type(generator).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"pytrain.comm.topk: dtype {x.dtype} not supported "
                        f"(float32, bfloat16, float16, float64)")
    if x.layout != torch.strided:
        raise ValueError(f"pytrain.comm.topk: x must be a dense tensor, got layout {x.layout}")
    if x.numel() == 0:
        raise ValueError("pytrain.comm.topk: x is empty")
    if not x.is_contiguous():
        raise ValueError(f"pytrain.comm.topk: x must be contiguous (shape {tuple(x.shape)}, "
                         f"strides {x.stride()})")


def default_generator(device: torch.device) -> torch.Generator:
    """pytrain's sampling generator of ``device`` (one per device, seeded with SEED)."""
    if device not in _generators:
        _generators[device] = torch.Generator(device=device).manual_seed(SEED)
    return _generators[device]


def _sample_magnitudes(flat: Tensor, generator: torch.Generator) -> Tensor:
    """|x| of SAMPLE entries of ``flat``: SAMPLE / RUN runs of RUN consecutive entries at random places (a cache
    line each: 2^16 scattered reads cost ~6 ms of cache and TLB misses on a 64 MiB tensor, 2^12 runs ~0.5 ms).
    Every op here stays below ATen's parallel grain: on a loaded machine a parallel region costs milliseconds."""
    starts = torch.randint(flat.numel() - RUN + 1, (SAMPLE // RUN, 1), device=flat.device,
                           generator=generator)
    idx = (starts + torch.arange(RUN, device=flat.device)).reshape(-1)
    return flat.index_select(0, idx).abs_()


def _threshold(mags: Tensor, rank: int) -> float:
    """The rank-th largest sampled magnitude (NaN, which torch.topk ranks first, counts as +inf); 0 past the sample."""
    if rank > mags.numel():
        return 0.0
    value = float(torch.topk(mags, rank).values[-1])
    return math.inf if math.isnan(value) else value


def _filter_at_least(flat: Tensor, k: int, impl: Optional[str], generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """topk_filter of ``flat`` at the sampled threshold, lowered until at least k entries are kept."""
    mags = _sample_magnitudes(flat, generator)
    rank = math.ceil(MARGIN * k * SAMPLE / flat.numel())
    while True:
        threshold = _threshold(mags, rank)
        values, indices = topk_filter(flat, threshold, impl=impl)
        if values.numel() >= k or threshold == 0.0:
            return values, indices
        rank *= 2


def _refine(values: Tensor, indices: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k kept entries of largest magnitude (NaN first), gathered with index_select (boolean masks and
    advanced indexing are several times slower on the CPU)."""
    keep = torch.topk(values.abs(), k, sorted=False).indices
    return values.index_select(0, keep), indices.index_select(0, keep)


def topk(x: Tensor, ratio: float, *, exact: bool = False, impl: Optional[str] = None,
         generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Top-k entries by magnitude of x.flatten(), k = max(1, round(ratio * x.numel())).

    x: contiguous tensor of any shape, float32 / bfloat16 / float16 / float64, any device.
    ratio: fraction of entries to keep, a float in (0, 1] (TypeError for a bool or a non-number).
    exact: False (default): between k and ceil(1.25 k) entries, a superset of an exact top-k (see the module
    docstring); True: exactly k entries, the set torch.topk(x.abs().flatten(), k) picks.
    impl: force a backend of the ``topk_filter`` kernel ("cpu", "cuda", "triton", "reference").
    generator: a torch.Generator on x's device for the threshold sample (None: pytrain's, see the module
    docstring); the same generator state gives the same selection.
    Returns (values (c,) in x's dtype, signed; indices (c,) int64 into x.flatten()), values = x.flatten()[indices].
    """
    _check(x, ratio, generator)
    flat = x.reshape(-1)
    k = topk_k(flat.numel(), ratio)
    if flat.numel() <= SMALL:
        return topk_exact(flat, k)
    values, indices = _filter_at_least(flat, k, impl, generator or default_generator(flat.device))
    limit = k if exact else math.ceil(MAX_EXCESS * k)
    if values.numel() > limit:
        return _refine(values, indices, k)
    return values, indices
