"""Alpha-beta (Hockney) cost model of the collectives, in seconds for messages of ``n_bytes``.

A point-to-point message of ``n`` bytes costs ``alpha + n * beta`` (alpha: latency in s, beta: inverse
bandwidth in s/byte; Hockney 1994).  With ``p`` processes (Thakur, Rabenseifner & Gropp 2005,
"Optimization of Collective Communication Operations in MPICH"; Patarasuk & Yuan 2009 for the ring):

    ring all-reduce            2 (p-1) (alpha + n beta / p)        reduce-scatter + all-gather
    reduce-scatter, all-gather   (p-1) (alpha + n beta / p)        n = the full (unsharded) buffer
    Rabenseifner all-reduce    2 log2(p) alpha + 2 (p-1)/p n beta   recursive halving + doubling
    tree all-reduce            2 log2(p) (alpha + n beta)           reduce up a binary tree, broadcast down
    all-to-all (pairwise)        (p-1) (alpha + n beta / p)        every rank sends n/p to each other rank
    hierarchical all-reduce    RS intra + AR inter (n/g) + AG intra (g ranks per node; Jia et al. 2018)

Traffic model (the one pytrain uses, also for the bytes its DDP communication hooks count): the ring
collectives and the pairwise all-to-all move a buffer of n bytes as ``steps`` rounds in each of which
every rank sends one message of n/p bytes, ``steps`` = 2 (p-1) for all-reduce and p-1 for reduce-scatter,
all-gather (n = the gathered buffer, p times each rank's share) and all-to-all; ``bytes_sent`` is
``steps n / p`` per rank, and each cost above is ``steps (alpha + n beta / p)``.

The reduction arithmetic is not modelled separately (gamma = 0): on a calibrated link it is part of
the fitted beta.  nccl-tests' reporting (PERFORMANCE.md): ``algbw = n / t``;
``busbw = algbw * 2 (p-1)/p`` for all-reduce, ``(p-1)/p`` for reduce-scatter / all-gather /
all-to-all, ``1`` for broadcast, reduce and p2p.  With one process every collective costs 0.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Union

from ._checks import count, real


@dataclass(frozen=True, repr=False)
class Link:
    """A link of the alpha-beta model: ``alpha`` latency (s) per message, ``beta`` s/byte (1 / bandwidth)."""

    alpha: float
    beta: float

    def __post_init__(self):
        real("Link.alpha", self.alpha, unit="s")
        real("Link.beta", self.beta, unit="s/byte")

    def __repr__(self) -> str:
        bandwidth = f"{1 / self.beta / 1e9:.3g} GB/s" if self.beta else "unlimited bandwidth"
        return f"Link(alpha {self.alpha * 1e6:.3g} us, {bandwidth})"

    @classmethod
    def from_bandwidth(cls, latency_s: float, bytes_per_s: float) -> "Link":
        """A link from its latency (s) and bandwidth (bytes/s), e.g. ``Link.from_bandwidth(5e-6, 400e9 / 8)``."""
        return cls(latency_s, 1.0 / real("bandwidth", bytes_per_s, strict=True, finite=False, unit="bytes/s"))

    @property
    def bandwidth(self) -> float:
        """Bytes per second (inf for beta = 0)."""
        return math.inf if self.beta == 0 else 1.0 / self.beta


def _check(n_bytes: float, p: int, link: Link, p_name: str = "p") -> None:
    """The arguments of every cost: a finite byte count >= 0, a process count ``p_name`` >= 1, a Link."""
    real("n_bytes", n_bytes)
    count(p_name, p)
    if not isinstance(link, Link):
        raise TypeError(f"link must be a pytrain.cost.Link, got {type(link).__name__}")


# ------------------------------------------------------------------------------------------ traffic model
#: rounds of the bandwidth-optimal algorithm on p ranks; in each, every rank sends one message of n/p bytes
RING_STEPS: Dict[str, Callable[[int], int]] = {
    "all_reduce": lambda p: 2 * (p - 1),  # reduce-scatter + all-gather
    "reduce_scatter": lambda p: p - 1,
    "all_gather": lambda p: p - 1,
    "all_to_all": lambda p: p - 1,  # pairwise exchange
}


def ring_steps(op: str, p: int) -> int:
    """Rounds of collective ``op`` on ``p`` ranks (module docstring): 2 (p-1) for all-reduce, else p-1."""
    if op not in RING_STEPS:
        raise ValueError(f"unknown collective {op!r}; one of {sorted(RING_STEPS)}")
    return RING_STEPS[op](p)


def bytes_sent(op: str, n_bytes: float, p: int) -> float:
    """Bytes one rank sends in collective ``op`` over an ``n_bytes`` buffer on ``p`` ranks: ``steps n / p``,
    i.e. 2 (p-1)/p n for all-reduce, (p-1)/p n for reduce-scatter and all-to-all, and (p-1) c for an
    all-gather of c bytes per rank (n = p c, the gathered buffer).  An int ``n_bytes`` gives whole bytes
    (rounded down), as the hooks count them."""
    real("n_bytes", n_bytes)
    count("p", p)
    steps = ring_steps(op, p)
    return steps * n_bytes // p if isinstance(n_bytes, int) else steps * n_bytes / p


# ------------------------------------------------------------------------------------------ costs (seconds)
def _ring(op: str, n_bytes: float, p: int, link: Link) -> float:
    """``steps (alpha + n beta / p)``: the rounds of ``op``, each one message of n/p bytes."""
    _check(n_bytes, p, link)
    return ring_steps(op, p) * (link.alpha + n_bytes * link.beta / p)


def ring_allreduce(n_bytes: float, p: int, link: Link) -> float:
    """Ring all-reduce of ``n_bytes`` on ``p`` ranks: ``2 (p-1) (alpha + n beta / p)`` s (Patarasuk & Yuan 2009)."""
    return _ring("all_reduce", n_bytes, p, link)


def reduce_scatter(n_bytes: float, p: int, link: Link) -> float:
    """Ring reduce-scatter of an ``n_bytes`` buffer (each rank keeps n/p): ``(p-1) (alpha + n beta / p)`` s."""
    return _ring("reduce_scatter", n_bytes, p, link)


def all_gather(n_bytes: float, p: int, link: Link) -> float:
    """Ring all-gather into an ``n_bytes`` buffer (each rank contributes n/p): ``(p-1) (alpha + n beta / p)`` s."""
    return _ring("all_gather", n_bytes, p, link)


def rabenseifner_allreduce(n_bytes: float, p: int, link: Link) -> float:
    """Recursive halving reduce-scatter + recursive doubling all-gather (Rabenseifner 2004; Thakur et al. 2005):
    ``2 log2(p) alpha + 2 (p-1)/p n beta`` s (p a power of two; other p round log2 up)."""
    _check(n_bytes, p, link)
    return 2 * math.ceil(math.log2(p)) * link.alpha + 2 * (p - 1) / p * n_bytes * link.beta


def tree_allreduce(n_bytes: float, p: int, link: Link) -> float:
    """Binary-tree reduce then broadcast of the whole message: ``2 ceil(log2 p) (alpha + n beta)`` s
    (Thakur et al. 2005, unpipelined tree)."""
    _check(n_bytes, p, link)
    return 2 * math.ceil(math.log2(p)) * (link.alpha + n_bytes * link.beta)


def all_to_all(n_bytes: float, p: int, link: Link) -> float:
    """Pairwise-exchange all-to-all, ``n_bytes`` sent per rank in total (n/p to each peer):
    ``(p-1) (alpha + n beta / p)`` s (Thakur et al. 2005)."""
    return _ring("all_to_all", n_bytes, p, link)


def hierarchical_allreduce(n_bytes: float, gpus_per_node: int, nodes: int, intra: Link, inter: Link) -> float:
    """Two-level all-reduce (Jia et al. 2018, "Highly Scalable Deep Learning Training System with Mixed-Precision"):
    ring reduce-scatter inside each node over ``gpus_per_node`` ranks, ring all-reduce of the n/g shard across
    ``nodes`` (g concurrent rings on separate NICs), ring all-gather inside the node:
    ``RS_intra(n, g) + AR_inter(n/g, N) + AG_intra(n, g)`` s."""
    _check(n_bytes, gpus_per_node, intra, "gpus_per_node")
    _check(n_bytes, nodes, inter, "nodes")
    return (reduce_scatter(n_bytes, gpus_per_node, intra) + ring_allreduce(n_bytes / gpus_per_node, nodes, inter)
            + all_gather(n_bytes, gpus_per_node, intra))


# bus-bandwidth factor per collective (nccl-tests PERFORMANCE.md): the ring collectives' bytes sent per byte
_BUS_FACTOR: Dict[str, Callable[[int], float]] = {
    **{op: (lambda p, _steps=steps: _steps(p) / p) for op, steps in RING_STEPS.items()},
    "broadcast": lambda p: 1.0,
    "reduce": lambda p: 1.0,
    "send_recv": lambda p: 1.0,
}


def algbw(n_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth in bytes/s: ``n / t`` (nccl-tests PERFORMANCE.md)."""
    return real("n_bytes", n_bytes) / real("seconds", seconds, strict=True)


def busbw(n_bytes: float, seconds: float, p: int, op: str = "all_reduce") -> float:
    """Bus bandwidth in bytes/s, comparable across p with the hardware peak: ``algbw * factor(op, p)``,
    factor ``2(p-1)/p`` for all-reduce, ``(p-1)/p`` for reduce-scatter / all-gather / all-to-all, 1 otherwise."""
    if op not in _BUS_FACTOR:
        raise ValueError(f"unknown collective {op!r}; one of {sorted(_BUS_FACTOR)}")
    count("p", p)
    return algbw(n_bytes, seconds) * _BUS_FACTOR[op](p)


# ops whose cost is linear in (alpha, beta) as ``a(p) alpha + b(p) n beta``: used by calibrate to fit a Link
COLLECTIVES: Dict[str, Callable[[float, int, Link], float]] = {
    "all_reduce": ring_allreduce,
    "reduce_scatter": reduce_scatter,
    "all_gather": all_gather,
    "all_to_all": all_to_all,
}


def coefficients(op: str, p: int) -> tuple:
    """(a, b) with ``cost(n) = a alpha + b n beta`` for the collective ``op`` on ``p`` ranks."""
    if op not in COLLECTIVES:
        raise ValueError(f"unknown collective {op!r}; one of {sorted(COLLECTIVES)}")
    model = COLLECTIVES[op]
    return model(0, p, Link(1.0, 0.0)), model(1.0, p, Link(0.0, 1.0))


_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)(?:bit)?(?:/s)?\s*$", re.IGNORECASE)
MAX_RATE = 400e9  # bits/s: the fastest link rate taken (tc's tbf is not trusted beyond it either)


def parse_rate(rate: Union[str, float, int]) -> float:
    """Link rate in bits per second from "1gbit", "500mbit", "0.5gbit", "10g" (tc's units: k/m/g bits, powers of
    10) or a number of bits/s.  Raises ValueError for anything else, or outside (0, 400 Gbit/s]."""
    if isinstance(rate, bool):
        raise TypeError(f"link rate must be a string like '1gbit' or bits/s as a number, got {rate!r}")
    if isinstance(rate, (int, float)):
        bits = float(rate)
    elif isinstance(rate, str):
        match = _RATE_RE.match(rate)
        if match is None:
            raise ValueError(f"link rate {rate!r}: expected a number with an optional unit kbit, mbit or gbit "
                             f"(e.g. '1gbit', '500mbit')")
        bits = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise TypeError(f"link rate must be a string like '1gbit' or bits/s as a number, got {type(rate).__name__}")
    if not 0 < bits <= MAX_RATE:  # also rejects NaN
        raise ValueError(f"link rate {rate!r} is {bits:g} bit/s; expected more than 0 and at most {MAX_RATE:g}")
    return bits


def format_rate(bits: float) -> str:
    """tc-style text of a rate in bits/s: 1e9 -> '1gbit', 5e8 -> '500mbit'."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"
