"""Machinery shared by pytrain's DDP communication hooks: states, statistics, the byte model, ordering.

Ordering.  Every rank must issue the same collectives in the same order, or gloo (and NCCL) pairs the wrong
operations and hangs.  DDP calls a comm hook once per bucket, in the same bucket order on every rank, from the
autograd thread.  torch's ``powerSGD_hook`` issues its second and third all-reduce from future callbacks, which
run on whichever thread completes the previous work: with several buckets in flight, bucket 1's first all-reduce
and bucket 0's second can then reach the ranks in different orders (the deadlock seen on gloo with torch
2.14.1).  pytrain's multi-step hooks therefore hand each bucket's whole job (compute and blocking collectives) to
one process-wide FIFO worker thread (``_ORDERED``): jobs run one at a time in hook-call order, so the sequence of
collectives is the same on every rank.  The hook returns at once, so backward keeps running while the worker
compresses and communicates.  The alternative, blocking inside the hook, would stall backward for every bucket's
round trips.  Single-collective hooks (``allreduce_hook``) issue their collective directly in the hook, which
is ordered already.

Pipelining.  A state's ``compress`` is a generator: it issues each collective asynchronously and yields, and
waits for it after the yield.  The worker keeps the buckets in flight; for each new bucket it runs the new one up
to its first collective, then moves every older one on by one stage, and the last bucket of a backward drains
them.  Older buckets move in the order their awaited collectives were issued (the wire delivers roughly in that
order, so the worker waits first for what is most likely done).  So bucket i's codec (quantizing, P = M Q, top-k
selection) runs while the bytes of earlier buckets are on the wire, instead of after them.  The schedule depends
only on the sequence of buckets and on its own past issues, which are the same on every rank, so the collectives
are issued in the same order everywhere.  A bucket's future completes when its last stage has run.

Bucket layouts and resuming.  DDP puts the gradients into buckets in parameter order for a fresh model's first
backward and rebuilds them in gradient-ready order after it, so the memories a state keeps per bucket (error
feedback, warm-start Qs) belong to the rebuilt layout, which a resumed run's new DDP only reaches after one
backward.  A state therefore names each parameter by its position in the first layout it sees (the same in every
process for one model and DDP configuration), records which positions each bucket held (``layout``, saved with
the memories), and when an iteration's buckets differ from the layout its memories belong to (the first backward
after a plain ``load_state_dict``), it regroups: the live buckets' gradients are gathered into the saved buckets,
each processed in its saved order as soon as all its gradients have arrived (the futures of the live buckets
complete when all their gradients are done; DDP waits for them only at the end of backward), and the results are
written back.  So a resumed run's gradients equal an uninterrupted run's with no priming step.

Byte model (``CommStats``): bytes one rank sends with bandwidth-optimal algorithms over W ranks, per
``pytrain.cost.collectives.bytes_sent`` (the one traffic model): all-reduce of B bytes 2 (W - 1) / W * B (ring
reduce-scatter + all-gather); all-gather of c bytes per rank (W - 1) * c; all-to-all of B bytes (B / W per
destination) (W - 1) / W * B.  ``bytes_uncompressed`` is what a plain all-reduce of the same bucket would send,
so ``compression_ratio`` is 1 for ``allreduce_hook``.
"""
from __future__ import annotations

import atexit
import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ...cost.collectives import bytes_sent
from ...ops.registry import FLOAT_DTYPES

# torch >= 2.14 names it all_gather_single and deprecates all_gather_into_tensor (torch 2.11 has only the latter).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

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


# ------------------------------------------------------------------------------------------ ordering
class _OrderedWorker:
    """One daemon thread running submitted jobs one at a time, in submission order.

    A job gets its future and completes it, then or from a later job (``HookState``: pipelined and regrouped
    buckets); if the job raises, its future gets the exception.  Each job runs with the submitting
    thread's intra-op thread count: with OpenMP that setting is per thread, and a fresh thread would use every
    core (oversubscribing, e.g. with one thread per rank set by the user).

    Exit.  A job completes the backward's futures from inside torch's C++ code, which releases the GIL, so the
    main thread can finish and the interpreter start shutting down while the worker is still in that call.  A
    daemon thread that then takes the GIL back is ended by ``pthread_exit``, which unwinds through C++ frames that
    may not unwind, and the process aborts ("terminate called without an active exception").  So at exit the
    interpreter waits, at most ``EXIT_WAIT_S``, until the worker has no job left (``wait_idle``)."""

    EXIT_WAIT_S = 5.0

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue[Tuple[Callable[[torch.futures.Future], None], torch.futures.Future, int]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0  # jobs submitted and not yet let go by the worker
        atexit.register(self.wait_idle, self.EXIT_WAIT_S)

    def submit(self, job: Callable[[torch.futures.Future], None]) -> torch.futures.Future:
        """Queue ``job``; it completes the returned future (or the future gets its exception)."""
        fut: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or in a forked child
                self._thread = threading.Thread(target=self._loop, name="pytrain-comm-hooks", daemon=True)
                self._thread.start()
                self._pending = 0  # a forked child inherits the count, not the thread that ran those jobs
        with self._idle:
            self._pending += 1
        self._jobs.put((job, fut, torch.get_num_threads()))
        return fut

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until every submitted job has run and been let go, at most ``timeout_s``; True if so."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def _loop(self) -> None:
        while True:
            job, fut, threads = self._jobs.get()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            try:
                job(fut)
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting backward)
                if not fut.done():
                    fut.set_exception(exc)
            # An idle worker must not keep the last job's state (and its process group) or bucket alive: the
            # group would then be destroyed at interpreter shutdown, from gloo's threads, which can abort.
            del job, fut
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()


_ORDERED = _OrderedWorker()


def submit(hook: str, state: "HookState", state_type: type, bucket: dist.GradBucket) -> torch.futures.Future:
    """Check the state and the bucket here, then run ``state.step(bucket)`` on the ordered worker."""
    if not isinstance(state, state_type):
        raise TypeError(f"{hook} needs a {state_type.__name__}, got {type(state).__name__}")
    state.check_bucket(bucket, COMPRESS_DTYPES)
    return _ORDERED.submit(lambda fut: state.step(bucket, fut))


# ------------------------------------------------------------------------------------------ states
def _resolve_group(name: str, process_group) -> Tuple[object, Tuple[int, ...]]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}: torch.distributed is not initialized; call init_process_group first")
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup) and group != dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError(f"{name}: process_group must be a torch.distributed ProcessGroup or None (the default "
                        f"group), got {group!r} ({type(group).__name__})")
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{name}: this process (rank {dist.get_rank()}) is not a member of the given process group")
    return group, tuple(dist.get_process_group_ranks(group))


class _SavedBucket:
    """A bucket of the layout the memories belong to, assembled from live buckets' gradients: the part of
    ``dist.GradBucket``'s interface the states use (index, buffer, gradients)."""

    def __init__(self, index: int, grads: List[Tensor]) -> None:
        self._index = index
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        self._grads = [v.view(g.shape) for v, g in zip(self._buffer.split([g.numel() for g in grads]), grads)]

    def index(self) -> int:
        return self._index

    def buffer(self) -> Tensor:
        return self._buffer

    def gradients(self) -> List[Tensor]:
        return self._grads

    def is_last(self) -> bool:
        return False  # the iteration count follows the live buckets


@dataclass
class _Regroup:
    """One backward whose live buckets differ from the saved layout (see the module docstring)."""

    grads: Dict[int, Tensor] = field(default_factory=dict)  # parameter position -> live gradient (a view)
    done: Set[int] = field(default_factory=set)  # saved bucket indices processed
    waiting: List[Tuple[Set[int], Tensor, torch.futures.Future]] = field(default_factory=list)


@dataclass(eq=False)
class _Flight:
    """A pipelined bucket: its remaining stages, buffer, future, and when its awaited collective was issued."""

    stages: Iterator[None]
    x: Tensor
    fut: torch.futures.Future
    issued: int = 0


class HookState:
    """Base of the hook states: process group, statistics, iteration count, per-bucket memories, bucket layout.

    ``iter`` counts backward passes (incremented after the last bucket of each).  Subclasses list their
    hyperparameters in ``config()`` and their tensors in ``memories`` (name -> {bucket index -> list of tensors});
    ``state_dict`` / ``load_state_dict`` save and restore both with the bucket layout they belong to, checking
    the process group; after a plain ``load_state_dict`` the next backward already continues the saved run
    (see the module docstring).

    Pickling (``torch.save(state)``, ``copy.deepcopy``), as torch's ``PowerSGDState``: everything but the process
    group and the process-local parameter names is kept.  An unpickled state has ``process_group`` None: it runs
    on the default group, provided that group has the saved ranks (else the first hook call raises and asks for
    ``state.process_group = group``); assigning ``process_group`` re-resolves the group and its ranks.
    """

    memory_names: Tuple[str, ...] = ()
    #: iterations of plain all-reduce before compressing
    start_iter = 1

    def __init__(self, process_group=None) -> None:
        self._process_group, self.group_ranks = _resolve_group(type(self).__name__, process_group)
        self.world_size = len(self.group_ranks)
        self.stats = CommStats()
        self.iter = 0
        self.memories: Dict[str, Dict[int, list]] = {name: {} for name in self.memory_names}
        self.scratch: Dict[int, object] = {}  # per-bucket work buffers, kept to avoid allocations (not saved)
        self.param_shapes: List[Tuple[int, ...]] = []  # by position in the first layout seen
        self.layout: Dict[int, Tuple[int, ...]] = {}  # bucket index -> parameter positions (memories' layout)
        self.binding = False  # the layout has served a compressed step: later layouts regroup into it
        self._reset_local()

    def _reset_local(self) -> None:
        """Process-local naming of the parameters (not saved, not pickled)."""
        self._positions: Dict[int, int] = {}  # id(parameter) -> position
        self._params: List[Tensor] = []  # keeps the ids valid
        self._named = False  # True once a whole backward has named every parameter
        self._regroup: Optional[_Regroup] = None
        self._finished: Set[int] = set()  # bucket indices processed in this backward
        self._adopt = False  # this backward's buckets become the layout
        self._flight: List[_Flight] = []  # pipelining: the buckets in flight
        self._issued = 0  # collectives issued by pipelined stages (orders the buckets in flight)

    def config(self) -> dict:
        return {}

    @property
    def process_group(self):
        return self._process_group

    @process_group.setter
    def process_group(self, group) -> None:
        self._process_group, self.group_ranks = _resolve_group(type(self).__name__, group)
        self.world_size = len(self.group_ranks)

    # -------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_process_group"] = None
        for key in ("_positions", "_params", "_named", "_regroup", "_finished", "_adopt", "_flight", "_issued"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_local()

    # -------------------------------------------------------------------------------------- checks
    def check_bucket(self, bucket: dist.GradBucket, dtypes: Tuple[torch.dtype, ...]) -> Tensor:
        """The bucket's buffer, after checking this process is in the state's group and the dtype."""
        if self._process_group is None:  # unpickled: the default group, if it has the saved ranks
            group, ranks = _resolve_group(type(self).__name__, None)
            if ranks != self.group_ranks:
                raise RuntimeError(f"{type(self).__name__}: this unpickled state was built for process group ranks "
                                   f"{list(self.group_ranks)}, the default group has ranks {list(ranks)}: assign "
                                   "state.process_group = <the group> before training")
            self._process_group = group
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
        dist.all_reduce(x, group=self.process_group, async_op=True).wait()
        return x.div_(self.world_size)

    # -------------------------------------------------------------------------------------- one bucket
    def positions(self, bucket: dist.GradBucket) -> Tuple[int, ...]:
        """The bucket's parameters as positions in the first layout this process saw (named during that backward)."""
        out = []
        for p in bucket.parameters():
            pos = self._positions.get(id(p))
            if pos is None:
                if self._named:
                    raise ValueError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} that was not in "
                                     "the first backward this state saw: one state per DDP model")
                pos = len(self._params)
                if pos < len(self.param_shapes) and tuple(p.shape) != self.param_shapes[pos]:
                    raise ValueError(f"{type(self).__name__}: parameter {pos} has shape {tuple(p.shape)}, the state was "
                                     f"saved with {self.param_shapes[pos]}: it belongs to another model or bucket setup")
                self._positions[id(p)] = pos
                self._params.append(p)
            out.append(pos)
        if bucket.is_last():
            self._named = True
            shapes = [tuple(p.shape) for p in self._params]
            if self.param_shapes and shapes != self.param_shapes:
                raise ValueError(f"{type(self).__name__}: the model has {len(shapes)} parameters, the state was saved "
                                 f"with {len(self.param_shapes)}: it belongs to another model")
            self.param_shapes = shapes
        return tuple(out)

    def step(self, bucket: dist.GradBucket, fut: torch.futures.Future) -> None:
        """One bucket's job (on the ordered worker).  It completes the futures of the buckets done by now (this
        one's, or later: see the module docstring) after its bookkeeping, so that a backward's end, where DDP has
        every future, finds ``iter`` counted."""
        done: List[Tuple[torch.futures.Future, Tensor]] = []  # (future, averaged buffer) of the buckets completed
        try:
            self._step(bucket, fut, done)
        except BaseException as exc:  # the backward fails: every future of it gets the error, the next starts clean
            waiting = [w for w, _ in done] + [f.fut for f in self._flight]
            waiting += [w for _, _, w in self._regroup.waiting] if self._regroup is not None else []
            for w in waiting:
                if w is not fut and not w.done():
                    w.set_exception(exc)
            self._regroup, self._finished = None, set()
            self._flight.clear()
            raise
        if bucket.is_last():
            self.iter += 1
            self._finished = set()
        for waiting, x in done:
            waiting.set_result(x)

    def _step(self, bucket: dist.GradBucket, fut: torch.futures.Future,
              done: List[Tuple[torch.futures.Future, Tensor]]) -> None:
        """Start the bucket (or gather it for regrouping), adding (future, buffer) of completed buckets to ``done``."""
        where = self.positions(bucket)
        index = bucket.index()
        if not self._finished and self._regroup is None:  # a backward's first bucket
            self._adopt = not self.binding  # no compressed step has used the layout yet: take this backward's
            if self._adopt:
                self.layout = {}
        if self._regroup is None and (self._adopt or self.layout.get(index) == where):
            if self._adopt:
                self.layout[index] = where
            x = bucket.buffer()
            new = _Flight(self.stages(bucket, x), x, fut)
            older = sorted(self._flight, key=lambda f: f.issued)
            self._flight.append(new)
            self._finished.add(index)
            for entry in [new] + older:  # the new bucket up to its first collective, every older one by a stage
                self.stage(entry, done)
            if bucket.is_last():
                self.drain(done)
        else:
            self.drain(done)  # the pipelined buckets first: the regrouped ones run one at a time
            self.regroup(bucket, where, fut, done)

    def stage(self, entry: "_Flight", done: List[Tuple[torch.futures.Future, Tensor]]) -> None:
        """Run one stage of a bucket in flight: up to its next collective, or to its end (then its (future,
        buffer) goes to ``done``)."""
        if next(entry.stages, StopIteration) is StopIteration:
            self._flight.remove(entry)
            done.append((entry.fut, entry.x))
        else:
            self._issued += 1
            entry.issued = self._issued

    def drain(self, done: List[Tuple[torch.futures.Future, Tensor]]) -> None:
        """Run the buckets in flight to their ends, always the one whose awaited collective was issued first."""
        while self._flight:
            self.stage(min(self._flight, key=lambda f: f.issued), done)

    def stages(self, bucket, x: Tensor) -> Iterator[None]:
        """The bucket's job as a generator (pipelined: see the module docstring): plain average before
        ``start_iter``, then ``compress``; waits for the device before DDP reads x."""
        if self.iter < self.start_iter:
            self.average(x)
        else:
            self.binding = True
            yield from self.compress(bucket, x)
        if x.is_cuda:  # the future carries no CUDA events: finish the worker's kernels before DDP reads x
            torch.cuda.current_stream(x.device).synchronize()

    def regroup(self, bucket: dist.GradBucket, where: Tuple[int, ...], fut: torch.futures.Future,
                done: List[Tuple[torch.futures.Future, Tensor]]) -> None:
        """Gather a live bucket into the saved layout; process every saved bucket that is complete, in order.
        Adds (future, buffer) of the live buckets whose gradients are all done to ``done``."""
        rg = self._regroup = self._regroup or _Regroup(done=set(self._finished))
        known = {pos for ps in self.layout.values() for pos in ps}
        for pos, grad in zip(where, bucket.gradients()):
            if pos not in known:
                raise ValueError(f"{type(self).__name__}: parameter {pos} is in no bucket of the saved layout: the "
                                 "state belongs to another model")
            rg.grads[pos] = grad
        rg.waiting.append((set(where), bucket.buffer(), fut))
        for index in sorted(self.layout):
            if index in rg.done:
                continue
            members = self.layout[index]
            if not all(pos in rg.grads for pos in members):
                break  # saved buckets run in their order, as in the saved run
            saved = _SavedBucket(index, [rg.grads[pos] for pos in members])
            for _ in self.stages(saved, saved.buffer()):
                pass
            for pos, grad in zip(members, saved.gradients()):
                rg.grads[pos].copy_(grad)
            rg.done.add(index)
            for left, _, _ in rg.waiting:
                left.difference_update(members)
        if bucket.is_last() and len(rg.done) != len(self.layout):
            raise ValueError(f"{type(self).__name__}: the saved layout's buckets {sorted(set(self.layout) - rg.done)} "
                             "did not all arrive in this backward: the state belongs to another model")
        for entry in [w for w in rg.waiting if not w[0]]:
            rg.waiting.remove(entry)
            done.append((entry[2], entry[1]))
        if bucket.is_last():
            self._regroup = None

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> Iterator[None]:
        """Replace ``x`` (the flat bucket) in place by its average over the ranks, compressed on the wire: a
        generator that yields after issuing each collective asynchronously and waits for it after the yield
        (pipelining: see the module docstring).  Run to its end, it has done the whole bucket.

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
        """Hyperparameters, group ranks, iteration, statistics, memories and the bucket layout they belong to
        (call between backward passes)."""
        return {"kind": type(self).__name__, "config": self.config(), "group_ranks": list(self.group_ranks),
                "iter": self.iter, "stats": asdict(self.stats),
                "memories": {name: {i: [t.clone() for t in ts] for i, ts in m.items()}
                             for name, m in self.memories.items()},
                "param_shapes": [list(s) for s in self.param_shapes],
                "layout": {i: list(ps) for i, ps in self.layout.items()}, "binding": self.binding,
                **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``: the next backward continues the saved run, whatever the bucket layout of the
        DDP model it runs in (a resumed run's fresh DDP included; see the module docstring)."""
        name = type(self).__name__
        if state.get("kind") != name:
            raise ValueError(f"{name}.load_state_dict: got the state of a {state.get('kind')}")
        if tuple(state["group_ranks"]) != self.group_ranks:
            raise ValueError(f"{name}.load_state_dict: state saved for process group ranks {state['group_ranks']}, "
                             f"this state's group has ranks {list(self.group_ranks)}")
        if state["config"] != self.config():
            raise ValueError(f"{name}.load_state_dict: saved with {state['config']}, this state has {self.config()}")
        if "layout" not in state:
            raise ValueError(f"{name}.load_state_dict: the state has no bucket layout (saved by an older pytrain)")
        shapes = [tuple(s) for s in state["param_shapes"]]
        if self._named and shapes and [tuple(p.shape) for p in self._params] != shapes:
            raise ValueError(f"{name}.load_state_dict: saved for parameters of shapes {shapes}, this state's model "
                             f"has {[tuple(p.shape) for p in self._params]}")
        self.iter = int(state["iter"])
        self.stats = CommStats(**state["stats"])
        self.memories = {name: {int(i): [t.clone() for t in ts] for i, ts in state["memories"][name].items()}
                         for name in self.memory_names}
        self.param_shapes = shapes
        self.layout = {int(i): tuple(int(p) for p in ps) for i, ps in state["layout"].items()}
        self.binding = bool(state["binding"])
        self._regroup = None
        self.load_extra_state(state)
