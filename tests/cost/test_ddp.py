"""DDP step model: buckets, overlap with the backward pass, compression; hand-computed cases and limits."""
import math

import pytest

from pytrain.cost import Link, bucket_sizes, ddp_step, ring_allreduce
from pytrain.cost.ddp import MAX_BUCKETS

MiB = 2**20
LINK = Link(alpha=100e-6, beta=1e-9)


def test_bucket_sizes():
    assert bucket_sizes(60 * MiB) == [MiB, 25 * MiB, 25 * MiB, 9 * MiB]
    assert bucket_sizes(MiB // 2) == [MiB // 2]
    assert bucket_sizes(0) == []
    assert bucket_sizes(3.5, bucket_bytes=1, first_bucket_bytes=1) == [1, 1, 1, 0.5]


@pytest.mark.parametrize("args, match", [
    ((math.inf,), "n_bytes"), ((math.nan,), "n_bytes"), ((-1,), "n_bytes"),
    ((MiB, math.nan), "bucket_bytes"), ((MiB, 0), "bucket_bytes"), ((MiB, 1, math.inf), "first_bucket_bytes"),
    ((MAX_BUCKETS + 0.5, 1, 1), "buckets"),  # a finite count the list cannot hold: refused, not looped over
    ((2**120,), "buckets"),
])
def test_bucket_sizes_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        bucket_sizes(*args)


def test_bucket_sizes_at_the_limit():
    assert len(bucket_sizes(MAX_BUCKETS, 1, 1)) == MAX_BUCKETS


def test_one_process_has_no_communication():
    est = ddp_step(10**6, compute_s=0.1, world_size=1, link=LINK, optimizer_s=0.01, copy_s=0.002)
    assert est.comm_s == 0 and est.exposed_comm_s == 0
    assert est.step_s == pytest.approx(0.112) and est.compute_s == pytest.approx(0.112)


def test_single_bucket_is_fully_exposed():
    # one bucket: it is ready only when the backward ends, so none of its all-reduce hides
    n = 10**6
    est = ddp_step(n, compute_s=0.3, world_size=4, link=LINK, first_bucket_bytes=4 * n)
    comm = ring_allreduce(4 * n, 4, LINK)
    assert est.comm_s == pytest.approx(comm) and est.exposed_comm_s == pytest.approx(comm)
    assert est.step_s == pytest.approx(0.3 + comm) and est.comm_compute_ratio == pytest.approx(comm / 0.3)


def test_hand_computed_two_buckets():
    # 2 equal buckets of 8 MB; compute 0.3 s = forward 0.1 + backward 0.2; each all-reduce (p=2) 0.1 + 8 ms
    n = 4 * 10**6
    est = ddp_step(n, compute_s=0.3, world_size=2, link=Link(0.05, 1e-9), bucket_bytes=8e6, first_bucket_bytes=8e6)
    t = 2 * 0.05 + 8e6 * 1e-9
    # bucket 0 ready at 0.2, ends 0.2 + t; bucket 1 ready at 0.3, starts at max(0.3, 0.2 + t), ends + t
    end = max(0.3, 0.2 + t) + t
    assert est.exposed_comm_s == pytest.approx(end - 0.3)
    assert ddp_step(n, compute_s=0.3, world_size=2, link=Link(0.05, 1e-9), bucket_bytes=8e6, first_bucket_bytes=8e6,
                    overlap=False).exposed_comm_s == pytest.approx(2 * t)


def test_overlap_hides_small_communication():
    est = ddp_step(25 * 10**6, compute_s=10.0, world_size=8, link=Link(5e-6, 1 / 50e9))
    last = ring_allreduce(est.buckets[-1], 8, Link(5e-6, 1 / 50e9))
    assert est.exposed_comm_s == pytest.approx(last, rel=1e-6)  # only the last bucket sticks out
    assert est.exposed_comm_s < est.comm_s


def test_monotonic():
    base = dict(compute_s=0.05, world_size=8, link=LINK)
    steps = [ddp_step(50 * 10**6, compression_ratio=r, **base).step_s for r in (1.0, 0.5, 0.25, 0.01)]
    assert steps == sorted(steps, reverse=True)  # less to send, never slower
    by_p = [ddp_step(50 * 10**6, compute_s=0.05, world_size=p, link=LINK).comm_s for p in (2, 4, 16)]
    assert by_p == sorted(by_p)
    assert ddp_step(10**7, overlap=False, **base).step_s >= ddp_step(10**7, **base).step_s
    codec = ddp_step(10**7, codec_s=0.01, **base)
    assert codec.comm_s == pytest.approx(ddp_step(10**7, **base).comm_s + 0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0), "world_size"),
    (dict(world_size=True), "world_size"),
    (dict(compute_s=-1.0), "compute_s"),
    (dict(compute_s=math.nan), "compute_s"),
    (dict(optimizer_s=math.inf), "optimizer_s"),
    (dict(compression_ratio=0.0), "compression_ratio"),
    (dict(compression_ratio=1.5), "compression_ratio"),
    (dict(backward_fraction=2.0), "backward_fraction"),
    (dict(bucket_bytes=0), "bucket"),
    (dict(bucket_bytes=math.nan), "bucket_bytes"),
    (dict(host_s_per_byte=-1e-9), "host_s_per_byte"),
])
def test_bad_input(kwargs, match):
    args = {**dict(compute_s=0.1, world_size=2, link=LINK), **kwargs}
    with pytest.raises(ValueError, match=match):
        ddp_step(10**6, **args)


def _per_bucket(n_params, compute_s, world_size, link, bucket_bytes, backward_fraction, codec_s, ratio, host):
    """(end of the last all-reduce, total comm, host work) of the module docstring's recurrence, one bucket at a
    time, with ``host`` seconds of the rank's compute per byte sent."""
    total = 4 * n_params
    sizes = bucket_sizes(total, bucket_bytes)
    h = codec_s + host * sum(2 * (world_size - 1) / world_size * size * ratio for size in sizes)
    done = end = comm = 0.0
    for size in sizes:
        done += size
        cost = ring_allreduce(size * ratio, world_size, link)
        comm += cost
        ready = (1 - backward_fraction) * compute_s + (backward_fraction * compute_s + h) * done / total
        end = max(ready, end) + cost
    return end, comm + h, h


@pytest.mark.parametrize("compute_s", [1e-4, 0.05, 0.3, 10.0])  # all-reduce bound ... hidden behind backward
@pytest.mark.parametrize("n_params, bucket_bytes", [(123_456_789, 25 * MiB), (10**7, 3e6), (10**6 // 3, 25 * MiB),
                                                    (25 * MiB // 4, 25 * MiB)])
@pytest.mark.parametrize("backward_fraction, codec_s, ratio, host", [(2 / 3, 0.0, 1.0, 0.0), (0.3, 0.01, 0.25, 0.0),
                                                                     (1.0, 0.0, 0.5, 0.0), (2 / 3, 0.02, 0.3, 1e-9)])
def test_runs_of_equal_buckets_match_the_per_bucket_recurrence(compute_s, n_params, bucket_bytes, backward_fraction,
                                                                codec_s, ratio, host):
    """ddp_step solves the recurrence once per run of equal buckets; the answer is the bucket-by-bucket one."""
    est = ddp_step(n_params, compute_s=compute_s, world_size=8, link=LINK, bucket_bytes=bucket_bytes,
                   backward_fraction=backward_fraction, codec_s=codec_s, compression_ratio=ratio,
                   host_s_per_byte=host)
    end, comm, h = _per_bucket(n_params, compute_s, 8, LINK, bucket_bytes, backward_fraction, codec_s, ratio, host)
    assert est.comm_s == pytest.approx(comm, rel=1e-12)
    assert est.exposed_comm_s == pytest.approx(max(h, end - compute_s), rel=1e-9, abs=1e-15)
    assert list(est.buckets) == pytest.approx([b * ratio for b in bucket_sizes(4 * n_params, bucket_bytes)])


def test_host_work_does_not_hide_behind_the_backward():
    """Codec and host work share the rank's compute: on a link far faster than the backward, the step is the
    compute plus all of that work."""
    fast = Link(0.0, 1e-15)
    est = ddp_step(10**7, compute_s=1.0, world_size=2, link=fast, codec_s=0.05, host_s_per_byte=1e-9)
    assert est.step_s == pytest.approx(1.0 + 0.05 + 1e-9 * 4e7, rel=1e-6)


def test_cost_does_not_grow_with_the_bucket_count():
    """A million buckets: the all-reduce model is asked once per run of equal buckets (first, full ones, rest)."""
    asked = []

    def allreduce(n_bytes, p, link):
        asked.append(n_bytes)
        return ring_allreduce(n_bytes, p, link)
    est = ddp_step(MAX_BUCKETS, compute_s=1.0, world_size=8, link=LINK, bucket_bytes=4, first_bucket_bytes=6,
                   allreduce=allreduce)
    assert asked == [6, 4, 2] and len(est.buckets) == MAX_BUCKETS
