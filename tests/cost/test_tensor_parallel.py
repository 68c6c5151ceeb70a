"""Tensor-parallel traffic: 4 all-reduces of s b h e per layer (Megatron), the same with sequence parallelism."""
import pytest

from pytrain.cost import Link, all_gather, reduce_scatter, ring_allreduce, tp_layer_bytes, tp_layer_comm

LINK = Link(3e-6, 1 / 300e9)


def test_volume_and_time():
    n = tp_layer_bytes(2048, 2, 4096, 2)
    assert n == 2048 * 2 * 4096 * 2
    assert tp_layer_comm(2048, 2, 4096, 8, LINK) == pytest.approx(4 * ring_allreduce(n, 8, LINK))
    sp = tp_layer_comm(2048, 2, 4096, 8, LINK, sequence_parallel=True)
    assert sp == pytest.approx(4 * (reduce_scatter(n, 8, LINK) + all_gather(n, 8, LINK)))
    assert sp == pytest.approx(tp_layer_comm(2048, 2, 4096, 8, LINK))  # same volume, same alpha count
    assert tp_layer_comm(2048, 2, 4096, 1, LINK) == 0


def test_bad_input():
    with pytest.raises(ValueError, match="hidden"):
        tp_layer_bytes(2048, 2, 0)
