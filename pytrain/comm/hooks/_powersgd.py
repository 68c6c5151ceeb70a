"""PowerSGD (Vogels et al. 2019, https://arxiv.org/abs/1905.13727) as a DDP communication hook.

Contract of torch's ``powerSGD_hook`` (torch.distributed.algorithms.ddp_comm_hooks): plain averaged all-reduce
for the first ``start_iter`` iterations; afterwards each gradient viewed as a matrix M (n x m) = (shape[0], rest)
is compressed at rank r = min(n, m, rank) when (n + m) r * min_compression_rate < n m, and all-reduced plainly
otherwise (vectors, small matrices).  Per bucket, with e the error-feedback memory and W ranks:

    M <- M + e                                   (error feedback)
    Q <- orthogonalize(Q_prev or randn)          (warm start; random Q drawn as torch draws it, see below)
    P = sum_ranks M Q                            all-reduce 1 (with the uncompressed tensors, averaged)
    P <- orthogonalize(P)
    Q = (1/W) sum_ranks M^T P                    all-reduce 2
    M_hat = P Q^T,  e <- M - M_hat               (the result replaces the gradient on every rank)

Same-shape matrices are batched (b, n, m) through pytrain's PowerSGD kernels (``powersgd_p``, ``powersgd_q``,
``orthogonalize_``).  The result depends on the ranks' inputs only through their sums, so the averaged gradients
equal torch's (with ``batch_tensors_with_same_shape=True`` and the same seed) up to rounding.  Two differences
that leave the averages unchanged: torch puts the uncompressed tensors' local-minus-average into e (their sum
over ranks is zero) and runs them through a separate all-reduce; pytrain keeps e for compressed matrices only
and sends the uncompressed tensors in the P all-reduce (two collectives per bucket instead of three).

Random Q: a numpy ``RandomState(seed)`` draws one seed per bucket that needs fresh Qs, and Q = randn(b, m, r)
from a torch generator with that seed, per shape group in order: the same numbers as torch's hook, identical on
every rank.  Gradients of dtype bfloat16 / float16 are compressed in float32 (P, Q sent in float32).

Non-finite gradients: a NaN or inf anywhere in a compressed matrix makes its whole M_hat NaN (the averaged Q is
checked), so it never comes back finite; that group's error memory is zeroed and the bucket's Qs redrawn, so a
step that GradScaler skips does not poison later steps.  Collectives run on the ordered worker (see _common).
"""

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..powersgd import orthogonalize_, powersgd_p, powersgd_q
from ...cost.collectives import bytes_sent
from ._common import HookState, submit


@dataclass(frozen=True)
class _Group:
    """Same-shape gradient matrices compressed as one batch."""

    shape: Tuple[int, int]  # (n, m)
    rank: int
    members: Tuple[int, ...]  # positions in bucket.gradients()

    @property
    def m_shape(self) -> Tuple[int, int, int]:
        return (len(self.members),) + self.shape

    @property
    def p_shape(self) -> Tuple[int, int, int]:
        return (len(self.members), self.shape[0], self.rank)

    @property
    def q_shape(self) -> Tuple[int, int, int]:
        return (len(self.members), self.shape[1], self.rank)


@dataclass(frozen=True)
class _Plan:
    """Which gradients of a bucket are compressed (by shape group) and which are sent as they are."""

    plain: Tuple[int, ...]
    groups: Tuple[_Group, ...]


def _numel(shape: Tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class PowerSGDState(HookState):
    """State of ``powersgd_hook``.

    rank: approximation rank r >= 1.  start_iter: iterations of plain all-reduce first (>= 2 with error
    feedback or warm start: DDP rebuilds its buckets after the first iteration).  min_compression_rate: a
    matrix is compressed only if it shrinks more than this.  error_feedback / warm_start / seed: as torch's
    ``use_error_feedback`` / ``warm_start`` / ``random_seed``.  ``stats``: bytes and calls (see CommStats);
    ``state_dict()`` holds the error and Q memories, the iteration and the RNG.
    """

    memory_names = ("error", "q")

    def __init__(self, process_group=None, rank: int = 4, start_iter: int = 10, min_compression_rate: float = 2,
                 error_feedback: bool = True, warm_start: bool = True, seed: int = 0) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"PowerSGDState: rank must be an int >= 1, got {rank!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"PowerSGDState: start_iter must be an int >= 0, got {start_iter!r}")
        if (error_feedback or warm_start) and start_iter < 2:
            raise ValueError("PowerSGDState: start_iter must be >= 2 with error_feedback or warm_start "
                             "(DDP rebuilds its buckets after the first iteration)")
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)):
            raise TypeError(f"PowerSGDState: min_compression_rate must be a number, got {min_compression_rate!r}")
        if not 0 < min_compression_rate < math.inf:
            raise ValueError(f"PowerSGDState: min_compression_rate must be finite and > 0, got {min_compression_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"PowerSGDState: seed must be an int in [0, 2^32), got {seed!r}")
        super().__init__(process_group)
        self.rank = rank
        self.start_iter = start_iter
        self.min_compression_rate = min_compression_rate
        self.error_feedback = bool(error_feedback)
        self.warm_start = bool(warm_start)
        self.rng = np.random.RandomState(seed)
        self._plans: Dict[Tuple[int, Tuple[torch.Size, ...]], _Plan] = {}

    def config(self) -> dict:
        return {"rank": self.rank, "start_iter": self.start_iter, "min_compression_rate": self.min_compression_rate,
                "error_feedback": self.error_feedback, "warm_start": self.warm_start}

    def extra_state(self) -> dict:
        _, keys, pos, has_gauss, gauss = self.rng.get_state()
        return {"rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}}

    def load_extra_state(self, extra: dict) -> None:
        rng = extra["rng"]
        self.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                            rng["gauss"]))

    # -------------------------------------------------------------------------------------- one bucket
    def plan(self, bucket_index: int, grads: List[Tensor]) -> _Plan:
        shapes = tuple(g.shape for g in grads)
        key = (bucket_index, shapes)
        if key not in self._plans:
            plain, by_shape = [], {}
            for i, shape in enumerate(shapes):
                n, m = (shape[0], _numel(shape[1:])) if len(shape) >= 2 else (1, 1)
                r = min(n, m, self.rank)
                if (n + m) * r * self.min_compression_rate < n * m:
                    by_shape.setdefault((n, m, r), []).append(i)
                else:
                    plain.append(i)
            groups = tuple(_Group((n, m), r, tuple(ix)) for (n, m, r), ix in by_shape.items())
            self._plans[key] = _Plan(tuple(plain), groups)
        return self._plans[key]

    def start_qs(self, bucket_index: int, plan: _Plan, device: torch.device) -> List[Tensor]:
        """Orthogonalized Qs: last step's (warm start) or freshly drawn as torch's hook draws them."""
        shapes = [g.q_shape for g in plan.groups]
        qs = self.memory("q", bucket_index, shapes) if self.warm_start else None
        if qs is None:
            gen = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))
            qs = [torch.randn(s, generator=gen).to(device) for s in shapes]
        for q in qs:
            orthogonalize_(q)
        return qs

    def matrices(self, bucket_index: int, plan: _Plan, grads: List[Tensor]) -> List[Tensor]:
        """Per group, M = gradients (+ error memory) as one float32 (b, n, m) batch, built in the error memory
        itself (a scratch buffer without error feedback): persistent, no large allocation per step."""
        shapes = [g.m_shape for g in plan.groups]
        if self.error_feedback:
            mats = self.memory("error", bucket_index, shapes)
            store = self.memories["error"]
        else:
            mats = self.scratch.get(bucket_index)
            store = self.scratch
        if mats is None or [M.shape for M in mats] != [torch.Size(s) for s in shapes]:
            mats = store[bucket_index] = [torch.zeros(s, dtype=torch.float32, device=grads[0].device) for s in shapes]
        for g, M in zip(plan.groups, mats):
            for j, i in enumerate(g.members):
                if self.error_feedback:
                    M[j].add_(grads[i].view(g.shape))
                else:
                    M[j].copy_(grads[i].view(g.shape))
        return mats

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> Iterator[None]:
        grads, index = bucket.gradients(), bucket.index()
        plan = self.plan(index, grads)
        mats = self.matrices(index, plan, grads)
        qs = self.start_qs(index, plan, x.device)

        plain = [grads[i] for i in plan.plain]
        flat_p, (plain_part, *ps) = _flat([(sum(t.numel() for t in plain),)] + [g.p_shape for g in plan.groups],
                                          x.device)
        if plain:
            torch.cat([t.reshape(-1).float() for t in plain], out=plain_part)
        for M, q, p in zip(mats, qs, ps):
            p.copy_(powersgd_p(M, q))
        work = dist.all_reduce(flat_p, group=self.process_group, async_op=True)
        yield
        work.wait()
        _unflatten(plain_part.div_(self.world_size), plain)

        flat_q, qs = _flat([g.q_shape for g in plan.groups], x.device)
        for M, p, q in zip(mats, ps, qs):
            q.copy_(powersgd_q(M, orthogonalize_(p)))
        work = dist.all_reduce(flat_q, group=self.process_group, async_op=True)
        yield
        work.wait()
        flat_q.div_(self.world_size)

        if self.decompress(grads, plan, mats, ps, qs) and self.warm_start:
            self.memories["q"][index] = qs
        else:
            self.memories["q"].pop(index, None)
        self.count(bytes_sent("all_reduce", flat_p.nbytes + flat_q.nbytes, self.world_size),
                   bytes_sent("all_reduce", x.nbytes, self.world_size))

    @staticmethod
    def decompress(grads: List[Tensor], plan: _Plan, mats: List[Tensor], ps: List[Tensor], qs: List[Tensor]) -> bool:
        """Write P Q^T straight into the gradients and leave M - P Q^T in ``mats``; False if some group was
        non-finite (its gradients become NaN, its M zeros)."""
        all_finite = True
        for g, M, p, q in zip(plan.groups, mats, ps, qs):
            finite = bool(torch.isfinite(q).all())
            for j, i in enumerate(g.members):
                dst = grads[i].view(g.shape)
                if not finite:
                    dst.fill_(float("nan"))
                elif dst.dtype == torch.float32:
                    torch.mm(p[j], q[j].t(), out=dst)
                else:
                    dst.copy_(torch.mm(p[j], q[j].t()))
                M[j].sub_(dst)
            if not finite:
                M.zero_()
            all_finite &= finite
        return all_finite


def _flat(shapes: List[Tuple[int, ...]], device: torch.device) -> Tuple[Tensor, List[Tensor]]:
    """One float32 buffer (sent in one collective) and views of it with the given shapes."""
    sizes = [_numel(s) for s in shapes]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    return flat, [v.view(s) for v, s in zip(flat.split(sizes), shapes)]


def _unflatten(flat: Tensor, tensors: List[Tensor]) -> None:
    for src, dst in zip(flat.split([t.numel() for t in tensors]), tensors):
        dst.copy_(src.view_as(dst))


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: PowerSGD-compressed averaged gradients (``DDP.register_comm_hook(state, powersgd_hook)``).

    The returned future holds the bucket's buffer, averaged over the ranks (approximately, once compressing).
    """
    return submit("powersgd_hook", state, PowerSGDState, bucket)
