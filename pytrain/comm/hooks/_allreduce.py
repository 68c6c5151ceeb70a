"""Plain averaged all-reduce as a DDP comm hook, counting its bytes: the baseline next to the compressing hooks.

Same result as DDP's default (sum all-reduce, divided by the world size); its ``stats`` give the baseline's bytes
on the wire, so a trainer reports bytes the same way whichever hook it runs.
"""

import torch
import torch.distributed as dist

from ...cost.collectives import bytes_sent
from ...ops.registry import FLOAT_DTYPES
from ._common import HookState

#: any floating gradient dtype: the sum is exact in the gradients' own dtype, as DDP's default
ALLREDUCE_DTYPES = FLOAT_DTYPES + (torch.float64,)


class AllReduceState(HookState):
    """State of ``allreduce_hook``: the process group and the byte counters (``stats``)."""


def allreduce_hook(state: AllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks with one asynchronous all-reduce (issued here, in hook order)."""
    if not isinstance(state, AllReduceState):
        raise TypeError(f"allreduce_hook needs an AllReduceState, got {type(state).__name__}")
    x = state.check_bucket(bucket, ALLREDUCE_DTYPES)
    nbytes = bytes_sent("all_reduce", x.nbytes, state.world_size)
    state.count(nbytes, nbytes)
    world = state.world_size
    fut = dist.all_reduce(x, group=state.process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))
