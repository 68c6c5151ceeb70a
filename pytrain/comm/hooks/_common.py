"""Machinery shared by pytrain's DDP communication hooks: states, statistics, the byte model, ordering.

Ordering.  Every rank must issue the same collectives in the same order, or gloo (and NCCL) pairs the wrong
operations and hangs.  DDP calls a comm hook once per bucket, in the same bucket order on every rank, from the
autograd thread.  torch's ``powerSGD_hook`` issues its second and third all-reduce from future callbacks, which
run on whichever thread completes the previous work: with several buckets in flight, bucket 1's first all-reduce
and bucket 0's second can then reach the ranks in different orders (the deadlock seen on gloo with torch
2.14.1).  pytrain's multi-step hooks therefore hand each bucket's whole job (compute and blocking collectives) to
one process-wide FIFO worker thread (``_ORDERED``): jobs run one at a time in hook-call order, so the sequence of
collectives is the same on every rank.  The hook returns at once, so backward keeps running while the worker
compresses and communicates (overlap is kept; what is lost is overlap *between* buckets' collectives, which
share one link anyway).  The alternative, blocking inside the hook, would stall backward for every bucket's
round trips.  Single-collective hooks (``allreduce_hook``) issue their collective directly in the hook, which
is ordered already.

Byte model (``CommStats``): bytes one rank sends with bandwidth-optimal algorithms over W ranks, per
``pytrain.cost.collectives.bytes_sent`` (the one traffic model): all-reduce of B bytes 2 (W - 1) / W * B (ring
reduce-scatter + all-gather); all-gather of c bytes per rank (W - 1) * c; all-to-all of B bytes (B / W per
destination) (W - 1) / W * B.  ``bytes_uncompressed`` is what a plain all-reduce of the same bucket would send,
so ``compression_ratio`` is 1 for ``allreduce_hook``.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ...cost.collectives import bytes_sent
from ...ops.registry import FLOAT_DTYPES

#: gradient dtypes the compressing hooks accept (they compute in float32)
COMPRESS_DTYPES = FLOAT_DTYPES


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class CommStats:
    """Cumulative counters of one hook state (bytes per the byte model in this module's docstring)."""

    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    calls: int = 0

    @property
    def compression_ratio(self) -> float:
        """bytes a plain all-reduce would send / bytes sent (nan before any traffic)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else float("nan")


def wait_allreduce(x: Tensor, group) -> Tensor:
    """Blocking sum all-reduce of ``x`` in place (for jobs running on the ordered worker)."""
    dist.all_reduce(x, group=group, async_op=True).wait()
    return x


# ------------------------------------------------------------------------------------------ ordering
class _OrderedWorker:
    """One daemon thread running submitted jobs one at a time, in submission order.

    Each job runs with the submitting thread's intra-op thread count: with OpenMP that setting is per thread,
    and a fresh thread would use every core (oversubscribing, e.g. with one thread per rank set by the user)."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue[Tuple[Callable[[], Tensor], torch.futures.Future, int]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], Tensor]) -> torch.futures.Future:
        """Queue ``job``; the returned future gets its result (or its exception)."""
        fut: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or in a forked child
                self._thread = threading.Thread(target=self._loop, name="pytrain-comm-hooks", daemon=True)
                self._thread.start()
        self._jobs.put((job, fut, torch.get_num_threads()))
        return fut

    def _loop(self) -> None:
        while True:
            job, fut, threads = self._jobs.get()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting backward)
                fut.set_exception(exc)
                continue
            fut.set_result(result)


_ORDERED = _OrderedWorker()


def submit(hook: str, state: "HookState", state_type: type, bucket: dist.GradBucket) -> torch.futures.Future:
    """Check the state and the bucket here, then run ``state.step(bucket)`` on the ordered worker."""
    if not isinstance(state, state_type):
        raise TypeError(f"{hook} needs a {state_type.__name__}, got {type(state).__name__}")
    state.check_bucket(bucket, COMPRESS_DTYPES)
    return _ORDERED.submit(lambda: state.step(bucket))


# ------------------------------------------------------------------------------------------ states
def _resolve_group(name: str, process_group) -> Tuple[object, Tuple[int, ...]]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}: torch.distributed is not initialized; call init_process_group first")
    group = dist.group.WORLD if process_group is None else process_group
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{name}: this process (rank {dist.get_rank()}) is not a member of the given process group")
    return group, tuple(dist.get_process_group_ranks(group))


class HookState:
    """Base of the hook states: process group, statistics, iteration count, per-bucket memories.

    ``iter`` counts backward passes (incremented after the last bucket, index 0, of each).  Subclasses list
    their hyperparameters in ``config()`` and their tensors in ``memories`` (name -> {bucket index -> list of
    tensors}); ``state_dict`` / ``load_state_dict`` save and restore both, checking the process group.
    """

    memory_names: Tuple[str, ...] = ()
    #: iterations of plain all-reduce before compressing: DDP rebuilds its buckets after the first iteration,
    #: so memories kept per bucket start from the second
    start_iter = 1

    def __init__(self, process_group=None) -> None:
        self.process_group, self.group_ranks = _resolve_group(type(self).__name__, process_group)
        self.world_size = len(self.group_ranks)
        self.stats = CommStats()
        self.iter = 0
        self.memories: Dict[str, Dict[int, list]] = {name: {} for name in self.memory_names}
        self.plain_until = 0  # iterations before this one run plainly (set by load_state_dict)
        self.scratch: Dict[int, object] = {}  # per-bucket work buffers, kept to avoid allocations (not saved)

    def config(self) -> dict:
        return {}

    # -------------------------------------------------------------------------------------- checks
    def check_bucket(self, bucket: dist.GradBucket, dtypes: Tuple[torch.dtype, ...]) -> Tensor:
        """The bucket's buffer, after checking this process is in the state's group and the dtype."""
        if dist.get_rank() not in self.group_ranks:
            raise RuntimeError(f"{type(self).__name__}: this process (rank {dist.get_rank()}) is not in the "
                               f"state's process group (ranks {list(self.group_ranks)}): the state was built for "
                               "another process group")
        x = bucket.buffer()
        if x.dtype not in dtypes:
            raise TypeError(f"{type(self).__name__}: gradient dtype {x.dtype} not supported "
                            f"({', '.join(str(d).removeprefix('torch.') for d in dtypes)})")
        return x

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise unless ``model`` (a DistributedDataParallel) communicates over this state's group."""
        ranks = tuple(dist.get_process_group_ranks(model.process_group))
        if ranks != self.group_ranks:
            raise ValueError(f"{type(self).__name__}: built for process group ranks {list(self.group_ranks)}, "
                             f"but the DDP model communicates over ranks {list(ranks)}")

    def count(self, sent: int, uncompressed: int) -> None:
        self.stats.bytes_sent += sent
        self.stats.bytes_uncompressed += uncompressed
        self.stats.calls += 1

    def average(self, x: Tensor) -> Tensor:
        """Plain blocking averaged all-reduce of ``x`` in place, counted (ordered worker only)."""
        nbytes = bytes_sent("all_reduce", x.nbytes, self.world_size)
        self.count(nbytes, nbytes)
        return wait_allreduce(x, self.process_group).div_(self.world_size)

    def step(self, bucket: dist.GradBucket) -> Tensor:
        """One bucket's job (on the ordered worker): plain average before ``start_iter``, then ``compress``."""
        x = bucket.buffer()
        if self.iter < max(self.start_iter, self.plain_until):
            self.average(x)
        else:
            self.compress(bucket, x)
        if bucket.is_last():
            self.iter += 1
        if x.is_cuda:  # the future carries no CUDA events: finish the worker's kernels before DDP reads x
            torch.cuda.current_stream(x.device).synchronize()
        return x

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> None:
        """Replace ``x`` (the flat bucket) in place by its average over the ranks, compressed on the wire.

        Each compressing state (PowerSGD, top-k, quantized) defines it; ``AllReduceState`` has no
        compressed path and its hook never calls it."""
        raise NotImplementedError(f"{type(self).__name__} has no compressed path")

    def residual(self, bucket_index: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        """The bucket's error-feedback residual (zeros at first), shaped like ``like``."""
        kept = self.memory("residual", bucket_index, (like.shape,))
        if kept is None:
            kept = self.memories["residual"][bucket_index] = [torch.zeros(like.shape, dtype=dtype, device=like.device)]
        return kept[0]

    def memory(self, name: str, bucket_index: int, shapes: Tuple[torch.Size, ...]) -> Optional[list]:
        """The tensors kept under ``name`` for a bucket, None if none; raises if their shapes differ."""
        kept = self.memories[name].get(bucket_index)
        if kept is not None and tuple(t.shape for t in kept) != tuple(shapes):
            raise ValueError(f"{type(self).__name__}: its {name} memory for bucket {bucket_index} has shapes "
                             f"{[tuple(t.shape) for t in kept]} but the bucket needs {[tuple(s) for s in shapes]}: "
                             "the state was built for another model or bucket layout")
        return kept

    # -------------------------------------------------------------------------------------- save / load
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Hyperparameters, group ranks, iteration, statistics and memories (call between steps)."""
        return {"kind": type(self).__name__, "config": self.config(), "group_ranks": list(self.group_ranks),
                "iter": self.iter, "stats": asdict(self.stats),
                "memories": {name: {i: [t.clone() for t in ts] for i, ts in m.items()}
                             for name, m in self.memories.items()},
                **self.extra_state()}

    def load_state_dict(self, state: dict, *, buckets_rebuilt: bool = False) -> None:
        """Restore a ``state_dict``.  The next iteration runs a plain all-reduce and keeps the memories: a
        resumed run wraps its model in a new DDP, whose first-iteration buckets differ from the rebuilt ones
        the memories belong to (DDP rebuilds them after that iteration).  ``buckets_rebuilt=True`` says the
        caller has already run one iteration of the new DDP (e.g. a zero-loss backward), so the memories fit
        the next iteration and it compresses at once: the resumed run then matches an uninterrupted one."""
        name = type(self).__name__
        if state.get("kind") != name:
            raise ValueError(f"{name}.load_state_dict: got the state of a {state.get('kind')}")
        if tuple(state["group_ranks"]) != self.group_ranks:
            raise ValueError(f"{name}.load_state_dict: state saved for process group ranks {state['group_ranks']}, "
                             f"this state's group has ranks {list(self.group_ranks)}")
        if state["config"] != self.config():
            raise ValueError(f"{name}.load_state_dict: saved with {state['config']}, this state has {self.config()}")
        self.iter = int(state["iter"])
        self.plain_until = 0 if buckets_rebuilt else self.iter + 1
        self.stats = CommStats(**state["stats"])
        self.memories = {name: {int(i): [t.clone() for t in ts] for i, ts in state["memories"][name].items()}
                         for name in self.memory_names}
        self.load_extra_state(state)
