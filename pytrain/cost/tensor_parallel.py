"""Tensor (Megatron) parallelism: per-layer communication volume and time.

Megatron-LM (Shoeybi et al. 2019) splits attention by heads and the MLP by columns then rows over t
ranks; each transformer layer all-reduces its s b h activation twice in the forward (after attention and
after the MLP) and twice in the backward: 4 all-reduces of ``s b h e`` bytes per layer per micro-batch.
Sequence parallelism (Korthikanti et al. 2022) replaces each all-reduce by a reduce-scatter and an
all-gather of the same total volume, and divides the layer-norm and dropout activations by t as well.
"""
from __future__ import annotations

from ._checks import count
from .collectives import Link, all_gather, reduce_scatter, ring_allreduce
from .pipeline import p2p_bytes

COLLECTIVES_PER_LAYER = 4  # forward 2 + backward 2


def tp_layer_bytes(seq: int, micro_batch: int, hidden: int, bytes_per_element: int = 2) -> int:
    """Bytes of each of the 4 per-layer all-reduces (or RS + AG pairs) of one micro-batch: ``s b h e``,
    the layer's output activation (the same tensor a pipeline sends across a stage boundary)."""
    return p2p_bytes(seq, micro_batch, hidden, bytes_per_element)


def tp_layer_comm(seq: int, micro_batch: int, hidden: int, tp: int, link: Link, *, bytes_per_element: int = 2,
                  sequence_parallel: bool = False) -> float:
    """Seconds of one layer's tensor-parallel communication for one micro-batch (forward + backward):
    ``4 * ring_allreduce(s b h e, t)``, or ``4 * (reduce_scatter + all_gather)`` with sequence parallelism."""
    count("tp", tp)
    n = tp_layer_bytes(seq, micro_batch, hidden, bytes_per_element)
    one = reduce_scatter(n, tp, link) + all_gather(n, tp, link) if sequence_parallel else ring_allreduce(n, tp, link)
    return COLLECTIVES_PER_LAYER * one
