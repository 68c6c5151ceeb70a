"""Top-k sparsified gradient averaging as a DDP communication hook, with error feedback.

Per bucket x (flattened) on each of W ranks, with r the residual of the previous step:

    r <- r + x                                     (error feedback, built in the residual's own memory)
    (v, i) = topk(r, ratio)                        pytrain.comm.topk: exact, or approximate (k to 1.25 k entries)
    all-gather the counts, then the (v, i) pairs padded to the largest count (one int32 buffer: value bits, index)
    x_hat = (1/W) sum_ranks scatter_add(i, v)      the same on every rank (same gather order)
    r[i] <- 0                                      what was sent leaves the residual

Bytes per rank: (W - 1) * 8 * max count (+ 8 for the count), against 2 (W - 1) / W * 4 * numel for a plain
all-reduce: ratio 0.01 on 2 ranks sends ~50x less.  The first iteration runs a plain all-reduce (DDP rebuilds
its buckets after it).  The approximate selection samples with the state's own generators (one per device,
seeded with ``pytrain.comm.topk.SEED``), saved in ``state_dict`` so that a resumed run selects what the
uninterrupted one would.  Non-finite entries sort above every number in ``topk``, so a NaN / inf is always sent
and lands in the average; the residual is zeroed after such a step.  Buckets need fewer than 2^31 elements.
"""

from typing import Dict, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from ..topk import SEED, check_ratio, topk
from ...cost.collectives import bytes_sent
from ._common import HookState, all_gather_single, submit

INDEX_LIMIT = 1 << 31  # indices travel as int32


class TopKState(HookState):
    """State of ``topk_hook``: ratio in (0, 1] of each bucket's entries sent; error_feedback keeps the unsent
    rest for the next step; exact=False uses the approximate (threshold) selection of ``pytrain.comm.topk``."""

    memory_names = ("residual",)

    def __init__(self, process_group=None, ratio: float = 0.01, error_feedback: bool = True, exact: bool = False):
        ratio = check_ratio("TopKState", ratio)
        super().__init__(process_group)
        self.ratio = ratio
        self.error_feedback = bool(error_feedback)
        self.exact = bool(exact)
        self.generators: Dict[str, torch.Generator] = {}  # device -> the sampling generator

    def config(self) -> dict:
        return {"ratio": self.ratio, "error_feedback": self.error_feedback, "exact": self.exact}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(SEED)
        return self.generators[key]

    def extra_state(self) -> dict:
        return {"generators": {key: gen.get_state() for key, gen in self.generators.items()}}

    def load_extra_state(self, extra: dict) -> None:
        self.generators = {}
        for key, rng in extra["generators"].items():
            self.generator(torch.device(key)).set_state(rng)

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> Iterator[None]:
        if x.numel() >= INDEX_LIMIT:
            raise ValueError(f"topk_hook: a bucket of {x.numel()} elements is too large (< 2^31; lower bucket_cap_mb)")
        world, group = self.world_size, self.process_group
        res = self.residual(bucket.index(), x, x.dtype) if self.error_feedback else None
        acc = x if res is None else res.add_(x)  # x + r, built in the residual: it is what stays unsent
        values, indices = topk(acc, self.ratio, exact=self.exact, generator=self.generator(x.device))
        # every rank's count, then every rank's (value bits, index) pairs padded to the largest count with zeros
        # at index 0, in one int32 buffer
        counts = torch.empty(world, dtype=torch.int64, device=x.device)
        count = torch.full((1,), values.numel(), dtype=torch.int64, device=x.device)
        work = all_gather_single(counts, count, group=group, async_op=True)
        yield
        work.wait()
        send = torch.zeros(2, int(counts.max()), dtype=torch.int32, device=x.device)
        send[0, :values.numel()] = values.float().view(torch.int32)
        send[1, :values.numel()] = indices
        recv = torch.empty((world * 2, send.shape[1]), dtype=torch.int32, device=x.device)
        work = all_gather_single(recv, send, group=group, async_op=True)
        if res is not None:  # while the pairs are on the wire
            res.index_fill_(0, indices, 0)
        yield
        work.wait()
        vals, idx = recv[0::2].reshape(-1).view(torch.float32), recv[1::2].reshape(-1).long()
        if res is not None and not bool(torch.isfinite(vals).all()):
            res.zero_()
        x.zero_().index_add_(0, idx, vals.div_(world).to(x.dtype))
        self.count(bytes_sent("all_gather", (count.nbytes + send.nbytes) * world, world),
                   bytes_sent("all_reduce", x.nbytes, world))


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: top-k sparsified averaged gradients (``DDP.register_comm_hook(state, topk_hook)``).

    The returned future holds the bucket's buffer: the average over ranks of each rank's selected entries.
    """
    return submit("topk_hook", state, TopKState, bucket)
