"""Data-parallel (DDP) step time: compute, bucketed gradient all-reduce overlapped with the backward pass.

PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training")
packs gradients in reverse parameter order into buckets (the first 1 MiB, then ``bucket_cap_mb`` = 25 MiB)
and all-reduces each bucket as soon as all its gradients are ready, while the backward pass continues.
Model: forward takes ``(1 - f) c`` and backward ``f c`` of the compute time c (f = 2/3: backward ~ 2x
forward FLOPs, Kaplan et al. 2020).  The rank's own compute (its cores, or its GPU's SMs) also runs the
hook's codec (``codec_s`` per step) and the host side of the collectives (``host_s_per_byte`` per byte sent:
on CPU ranks the TCP stack and copies, see ``calibrate``); that work shares the compute with the backward,
so it cannot hide behind it: h = codec_s + host_s_per_byte * (bytes sent).  Bucket i, holding a fraction of
the gradient bytes, is ready when that fraction of the backward and of h is done; buckets go out one at a
time in order on one channel (the wire):

    ready_i = (1 - f) c + (f c + h) * (bytes of buckets 0..i) / (all bytes)
    start_i = max(ready_i, end_{i-1});   end_i = start_i + T_allreduce(r * bucket_i)
    step    = max(c + h, end_last) + copy_s + optimizer_s     (overlap=False: c + h + sum of T + copy_s + optimizer_s)

The buckets come in at most three sizes (the first, a run of k equal full ones, the remainder), so the
recurrence is solved per run, not per bucket: over a run of k buckets of cost C each, unrolled,
``end_k = max(end_0 + k C, max_j (ready_j + (k - j + 1) C))``, and ``ready_j + (k - j + 1) C`` is linear in
j, so its maximum is at j = 1 or j = k.  A step costs the same to predict for 1 MB or 1 TB of gradients.

``copy_s``: copying the gradients into the flat buckets and back out (DDP without
``gradient_as_bucket_view``: 2 x the gradient bytes at memory-copy speed), done even on one process.

``r`` is the compression ratio (bytes sent / bytes of the fp32 gradient: fp16 0.5, int8 ~0.25, top-k
2k/n with indices, PowerSGD rank-r (m + n) r / (m n)); ``codec_s`` is the per-step time to compress and
decompress.  ``comm_s`` = h + sum of T; comm/compute ratio = comm_s / compute_s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from ._checks import count, real
from .collectives import Link, bytes_sent, ring_allreduce

DEFAULT_BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20
BACKWARD_FRACTION = 2.0 / 3.0
#: the most buckets ``bucket_sizes`` lists (and ``DDPStepEstimate.buckets`` holds): 26 TB in 25 MiB buckets
MAX_BUCKETS = 10**6


@dataclass(frozen=True, repr=False)
class DDPStepEstimate:
    """Seconds of one DDP step: ``compute_s`` (forward + backward + optimizer + bucket copies), ``comm_s`` (all bucket
    all-reduces and codec work), ``exposed_comm_s`` (the part not hidden behind the backward pass),
    ``step_s`` = compute + exposed; ``comm_compute_ratio`` = comm_s / compute_s; ``buckets``: bytes sent each."""

    compute_s: float
    comm_s: float
    exposed_comm_s: float
    step_s: float
    comm_compute_ratio: float
    buckets: tuple = ()

    def __repr__(self) -> str:
        sizes = (f"{len(self.buckets)} buckets of {min(self.buckets) / 2**20:.3g}-{max(self.buckets) / 2**20:.3g} MiB"
                 if self.buckets else "no buckets")
        return (f"DDPStepEstimate(step {self.step_s * 1e3:.4g} ms = compute {self.compute_s * 1e3:.4g} ms + exposed "
                f"comm {self.exposed_comm_s * 1e3:.4g} ms of {self.comm_s * 1e3:.4g} ms; comm/compute "
                f"{self.comm_compute_ratio:.3g}; {sizes} sent)")


def bucket_sizes(n_bytes: float, bucket_bytes: float = DEFAULT_BUCKET_BYTES,
                 first_bucket_bytes: float = FIRST_BUCKET_BYTES) -> List[float]:
    """DDP's bucket sizes in bytes, in the order they are reduced: ``first_bucket_bytes``, then
    ``bucket_bytes`` each, the remainder last (parameter boundaries ignored).  Raises ValueError for more
    than ``MAX_BUCKETS`` buckets."""
    sizes: List[float] = []
    for size, n in _bucket_runs(n_bytes, bucket_bytes, first_bucket_bytes):
        sizes += [size] * n
    return sizes


def _bucket_runs(n_bytes: float, bucket_bytes: float, first_bucket_bytes: float) -> List[Tuple[float, int]]:
    """``bucket_sizes`` as runs of equal buckets, (size, how many) in order: the first, the full ones, the rest."""
    total = real("n_bytes", n_bytes)
    cap = real("bucket_bytes", bucket_bytes, strict=True)
    first = real("first_bucket_bytes", first_bucket_bytes, strict=True)
    if total <= first:
        return [(total, 1)] if total > 0 else []
    full, rest = divmod(total - first, cap)
    if 1 + full + (rest > 0) > MAX_BUCKETS:
        raise ValueError(f"n_bytes={n_bytes!r} makes {1 + full + (rest > 0):.3g} buckets of bucket_bytes="
                         f"{bucket_bytes!r}, more than the {MAX_BUCKETS:,} modelled: use larger buckets")
    return [(size, n) for size, n in ((first, 1), (cap, int(full)), (rest, int(rest > 0))) if n]


def ddp_step(n_params: int, *, compute_s: float, world_size: int, link: Link,
             bucket_bytes: float = DEFAULT_BUCKET_BYTES, bytes_per_element: int = 4, compression_ratio: float = 1.0,
             overlap: bool = True, codec_s: float = 0.0, optimizer_s: float = 0.0, copy_s: float = 0.0,
             host_s_per_byte: float = 0.0, first_bucket_bytes: float = FIRST_BUCKET_BYTES,
             backward_fraction: float = BACKWARD_FRACTION,
             allreduce: Callable[[float, int, Link], float] = ring_allreduce) -> DDPStepEstimate:
    """Predicted DDP step (module docstring).  ``compute_s``: forward + backward seconds of one rank (measured,
    or FLOPs / rate); ``optimizer_s``: the optimizer step after the last bucket; ``codec_s``: compression work
    per step; ``copy_s``: gradient copies into and out of the buckets; ``host_s_per_byte``: the rank's compute
    per byte it sends (``Calibration.host_s_per_byte``; 0 where a NIC or NCCL moves the bytes);
    ``allreduce(n_bytes, p, link)``: the collective's cost model (ring by default)."""
    n_params, bytes_per_element = count("n_params", n_params, 0), count("bytes_per_element", bytes_per_element)
    world_size = count("world_size", world_size)
    for name, seconds in (("compute_s", compute_s), ("codec_s", codec_s), ("optimizer_s", optimizer_s),
                          ("copy_s", copy_s), ("host_s_per_byte", host_s_per_byte)):
        real(name, seconds, unit="s")
    real("compression_ratio (bytes sent / gradient bytes)", compression_ratio, strict=True, maximum=1.0)
    real("backward_fraction", backward_fraction, maximum=1.0)
    if not isinstance(link, Link):
        raise TypeError(f"link must be a pytrain.cost.Link, got {type(link).__name__}")
    if not callable(allreduce):
        raise TypeError(f"allreduce must be a cost function (n_bytes, p, link) -> seconds, got {allreduce!r}")
    total = n_params * bytes_per_element
    runs = _bucket_runs(total, bucket_bytes, first_bucket_bytes)
    host = codec_s + host_s_per_byte * sum(n * bytes_sent("all_reduce", size * compression_ratio, world_size)
                                           for size, n in runs)
    forward, backward = (1 - backward_fraction) * compute_s, backward_fraction * compute_s + host
    done = end = wire = 0.0
    sent: List[float] = []  # bytes each bucket sends
    for size, n in runs:  # n buckets of `size` bytes, each ready when its bytes' share of the backward is done
        cost = allreduce(size * compression_ratio, world_size, link)
        ready_first, ready_last = (forward + backward * (done + j * size) / total for j in (1, n))
        end = max(end + n * cost, ready_first + n * cost, ready_last + cost)  # the module docstring's end_k
        wire += n * cost
        done += n * size
        sent += [size * compression_ratio] * n
    comm = host + wire
    exposed = max(host, end - compute_s) if overlap else comm
    full_compute = compute_s + optimizer_s + copy_s
    return DDPStepEstimate(full_compute, comm, exposed, full_compute + exposed,
                           comm / full_compute if full_compute > 0 else (float("inf") if comm else 0.0),
                           tuple(sent))
