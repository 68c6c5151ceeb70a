"""Alpha-beta collectives: hand-computed values, limits, identities, nccl-tests bandwidth conversions."""
import math

import pytest

from pytrain.cost import (Link, algbw, all_gather, all_to_all, busbw, bytes_sent, hierarchical_allreduce,
                          rabenseifner_allreduce, reduce_scatter, ring_allreduce, tree_allreduce)

LINK = Link(alpha=10e-6, beta=1e-9)  # 10 us, 1 GB/s
ALL = (ring_allreduce, reduce_scatter, all_gather, rabenseifner_allreduce, tree_allreduce, all_to_all)


def test_hand_computed():
    n = 8e6
    assert ring_allreduce(n, 4, LINK) == pytest.approx(6 * (10e-6 + 2e6 * 1e-9))  # 2(p-1)(a + n b / p)
    assert reduce_scatter(n, 4, LINK) == pytest.approx(3 * (10e-6 + 2e-3))
    assert all_gather(n, 4, LINK) == reduce_scatter(n, 4, LINK)
    assert rabenseifner_allreduce(n, 8, LINK) == pytest.approx(6 * 10e-6 + 2 * 7 / 8 * 8e-3)
    assert tree_allreduce(n, 8, LINK) == pytest.approx(6 * (10e-6 + 8e-3))
    assert all_to_all(n, 4, LINK) == pytest.approx(3 * (10e-6 + 2e-3))


def test_bytes_sent_is_the_beta_term():
    """The traffic model the hooks count with: whole bytes for whole bytes, and the costs' bandwidth term."""
    assert bytes_sent("all_reduce", 1000, 4) == 1500 and bytes_sent("all_reduce", 1000, 3) == 1333
    assert bytes_sent("all_gather", 4 * 10, 4) == 30  # (p-1) c for c bytes per rank
    assert bytes_sent("reduce_scatter", 1000, 4) == bytes_sent("all_to_all", 1000, 4) == 750
    assert bytes_sent("all_reduce", 5, 1) == 0 and isinstance(bytes_sent("all_reduce", 7, 3), int)
    for op, fn in (("all_reduce", ring_allreduce), ("reduce_scatter", reduce_scatter), ("all_gather", all_gather),
                   ("all_to_all", all_to_all)):
        assert fn(3e7, 8, Link(0, 1e-9)) == pytest.approx(bytes_sent(op, 3e7, 8) * 1e-9)
    with pytest.raises(ValueError, match="unknown collective 'gather'"):
        bytes_sent("gather", 10, 2)


def test_identities_and_limits():
    n = 3e7
    for p in (2, 3, 8, 64):
        assert ring_allreduce(n, p, LINK) == pytest.approx(reduce_scatter(n, p, LINK) + all_gather(n, p, LINK))
        assert rabenseifner_allreduce(n, p, Link(0, 1e-9)) == pytest.approx(ring_allreduce(n, p, Link(0, 1e-9)))
    for fn in ALL:
        assert fn(n, 1, LINK) == 0  # one rank communicates nothing
        assert fn(0, 4, Link(0, 1e-9)) == 0
    # bandwidth term of the ring tends to 2 n beta as p grows; latency term grows linearly in p
    assert ring_allreduce(n, 10**6, Link(0, 1e-9)) == pytest.approx(2 * n * 1e-9, rel=1e-5)
    assert ring_allreduce(1, 1001, Link(1e-6, 0)) == pytest.approx(2000e-6)
    # small messages: log-latency algorithms beat the ring; large: the ring beats the tree
    assert rabenseifner_allreduce(8, 64, LINK) < ring_allreduce(8, 64, LINK)
    assert ring_allreduce(1e9, 64, LINK) < tree_allreduce(1e9, 64, LINK)


def test_hierarchical():
    intra, inter = Link(2e-6, 1 / 300e9), Link(10e-6, 1 / 25e9)
    n, g, nodes = 1e9, 8, 4
    expected = reduce_scatter(n, g, intra) + ring_allreduce(n / g, nodes, inter) + all_gather(n, g, intra)
    assert hierarchical_allreduce(n, g, nodes, intra, inter) == pytest.approx(expected)
    assert hierarchical_allreduce(n, g, 1, intra, inter) == pytest.approx(ring_allreduce(n, g, intra))
    assert hierarchical_allreduce(n, g, nodes, intra, inter) < ring_allreduce(n, g * nodes, inter)


def test_bandwidths():
    assert algbw(1e9, 0.5) == 2e9
    assert busbw(1e9, 0.5, 8) == pytest.approx(2e9 * 2 * 7 / 8)
    assert busbw(1e9, 0.5, 8, "all_gather") == pytest.approx(2e9 * 7 / 8)
    assert busbw(1e9, 0.5, 8, "broadcast") == 2e9
    # busbw of a modelled ring all-reduce equals the link bandwidth for large messages (nccl-tests' point)
    n, p = 1e10, 16
    assert busbw(n, ring_allreduce(n, p, Link(0, 1e-9)), p) == pytest.approx(1e9)
    assert Link.from_bandwidth(1e-6, 50e9).beta == pytest.approx(2e-11) and Link(0, 0).bandwidth == math.inf


@pytest.mark.parametrize("call, exc, match", [
    (lambda: Link(-1e-6, 1e-9), ValueError, "alpha"),
    (lambda: Link(1e-6, math.nan), ValueError, "beta"),
    (lambda: Link.from_bandwidth(1e-6, 0), ValueError, "bandwidth"),
    (lambda: ring_allreduce(-1, 2, LINK), ValueError, "n_bytes"),
    (lambda: ring_allreduce(10, 0, LINK), ValueError, "p must"),
    (lambda: ring_allreduce(10, 2.5, LINK), ValueError, "p must"),
    (lambda: ring_allreduce(10, 2, (1e-6, 1e-9)), TypeError, "Link"),
    (lambda: algbw(10, 0), ValueError, "seconds"),
    (lambda: busbw(10, 1, 2, "scan"), ValueError, "unknown collective"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_link_repr_is_readable():
    assert repr(Link(8e-6, 1 / 50e9)) == "Link(alpha 8 us, 50 GB/s)"
    assert repr(Link(0, 0)) == "Link(alpha 0 us, unlimited bandwidth)"
