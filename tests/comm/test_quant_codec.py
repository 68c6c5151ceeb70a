"""QuantState.compress (the fused codec ops) against the maths of pytrain/comm/hooks/_quant.py composed from
quantize / dequantize, on W emulated ranks in one process: one thread per rank, the all-to-all and all-gather
exchanging the ranks' buffers.  The averaged buckets must be bit-identical to the composition, and so must the
residuals: r = (x + r) - dequantize(q) everywhere, plus W (a_j - dequantize(quantize(a_j))) on the owned chunk.

Covered: int8 / fp8_e4m3 / fp8_e5m2, W = 2 and 3, bucket sizes that leave a partial last group, a partial last
chunk and a chunk with no elements, a block size whose chunks are not a multiple of 4 bytes (padded rows),
bfloat16 buckets, error feedback on and off, two steps (the residual carried), and a NaN on one rank (NaN blocks
on every rank, residuals zeroed).
"""
import threading

import pytest
import torch
import torch.distributed as dist

from pytrain.comm import QuantState
from pytrain.comm.hooks import _quant
from pytrain.ops.quantize import dequantize_groups, quantize_groups


class _Bucket:
    def __init__(self, index):
        self._index = index

    def index(self):
        return self._index


class _Done:
    def wait(self):
        return None


class _Ranks:
    """Collectives among ``world`` threads: each rank's tensors are posted, then read by every rank."""

    def __init__(self, world):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world)
        self.posted = [None] * world

    def exchange(self, tensor):
        self.posted[self.local.rank] = tensor.clone()
        self.barrier.wait()
        everything = list(self.posted)
        self.barrier.wait()
        return everything

    def all_to_all_single(self, recv, send, group=None, async_op=False):
        rows = self.exchange(send)
        for src in range(self.world):
            recv[src].copy_(rows[src][self.local.rank])
        return _Done()

    def all_gather_single(self, out, inp, group=None, async_op=False):
        for src, row in enumerate(self.exchange(inp)):
            out[src].copy_(row.reshape(-1))
        return _Done()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0,
                                world_size=1)
    yield
    dist.destroy_process_group()


def run_ranks(monkeypatch, states, buckets):
    """compress every rank's bucket (in place) in its own thread."""
    ranks = _Ranks(len(states))
    monkeypatch.setattr(dist, "all_to_all_single", ranks.all_to_all_single)
    monkeypatch.setattr(_quant, "all_gather_single", ranks.all_gather_single)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: ranks.local.rank)
    errors = []

    def rank_main(rank):
        ranks.local.rank = rank
        try:
            for _ in states[rank].compress(_Bucket(0), buckets[rank]):  # a generator: one stage per collective
                pass
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(states))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def composed(xs, rs, fmt, bs):
    """(averaged buckets, residuals after) of the module docstring's maths, from quantize / dequantize."""
    world, n = len(xs), xs[0].numel()
    chunk = -(-n // (world * bs)) * bs
    deq = lambda q: dequantize_groups(*q, bs, impl="reference")  # noqa: E731
    padded = [torch.zeros(world * chunk) for _ in xs]
    for p, x, r in zip(padded, xs, rs):
        p[:n] = x.float() + r if r is not None else x.float()
    q = [quantize_groups(p, fmt, bs, impl="reference") for p in padded]
    sums = [deq(qk) for qk in q]
    means = []
    for j in range(world):
        a = sums[0][j * chunk:(j + 1) * chunk]
        for k in range(1, world):
            a = a + sums[k][j * chunk:(j + 1) * chunk]
        means.append(a / world)
    q2 = [quantize_groups(a, fmt, bs, impl="reference") for a in means]
    final = torch.cat([deq(qj) for qj in q2])[:n]
    out = [final.to(x.dtype) for x in xs]
    if rs[0] is None:
        return out, None
    if not bool(torch.cat([qj[1] for qj in q2]).isfinite().all()):
        return out, [torch.zeros(n) for _ in xs]
    res = []
    for k, p in enumerate(padded):
        r = (p - sums[k])[:n]
        own = slice(min(k * chunk, n), min((k + 1) * chunk, n))
        r[own] = r[own] + ((means[k] - deq(q2[k])) * world)[:own.stop - own.start]
        res.append(r)
    return out, res


CASES = [("int8", 2, 1000, 256), ("fp8_e4m3", 2, 3000, 256), ("fp8_e5m2", 3, 2000, 256), ("int8", 3, 300, 64),
         ("int8", 2, 1001, 7), ("fp8_e4m3", 3, 50, 7)]


@pytest.mark.parametrize("fmt, world, n, bs", CASES)
@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_matches_composition(group, monkeypatch, fmt, world, n, bs, feedback, dtype):
    states = [QuantState(fmt=fmt, block_size=bs, error_feedback=feedback) for _ in range(world)]
    for s in states:
        s.world_size = world
    gen = torch.Generator().manual_seed(0)
    rs = [torch.zeros(n) if feedback else None for _ in range(world)]
    for step in range(2):
        xs = [(torch.randn(n, generator=gen) * 10.0 ** (k - step)).to(dtype) for k in range(world)]
        want, want_r = composed(xs, rs, fmt, bs)
        got = [x.clone() for x in xs]
        run_ranks(monkeypatch, states, got)
        for k in range(world):
            assert torch.equal(got[k], want[k]), f"step {step} rank {k}: averaged bucket differs"
            if feedback:
                r = states[k].residual(0, got[k], torch.float32)
                assert torch.equal(r, want_r[k]), f"step {step} rank {k}: residual differs"
        rs = want_r if feedback else rs


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_nan_on_one_rank_reaches_every_rank(group, monkeypatch, fmt):
    world, n, bs = 2, 1000, 256
    states = [QuantState(fmt=fmt, block_size=bs) for _ in range(world)]
    for s in states:
        s.world_size = world
    xs = [torch.randn(n) for _ in range(world)]
    xs[1][700] = float("nan")
    want, want_r = composed(xs, [torch.zeros(n)] * world, fmt, bs)
    got = [x.clone() for x in xs]
    run_ranks(monkeypatch, states, got)
    for k in range(world):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True)
        assert got[k][512:768].isnan().all() and got[k][:512].isfinite().all()
        assert torch.equal(states[k].residual(0, got[k], torch.float32), torch.zeros(n))
