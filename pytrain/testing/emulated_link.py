"""Rank functions for the emulated-link tests and benchmarks (spawned processes import them by module name).

``transfer_seconds`` times point-to-point sends between rank pairs, so a test can check that the ranks talk over
the emulated link at its rate; ``allreduce_then_die`` kills one rank mid-job, to check that the link still goes.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Tuple

import torch
import torch.distributed as dist


def transfer_seconds(n_bytes: int, pairs: Tuple[Tuple[int, int], ...] = ((0, 1), (1, 0))) -> Dict[str, float]:
    """For each (src, dst) in ``pairs`` in turn: ``src`` sends ``n_bytes`` to ``dst``; returns
    {"src->dst": seconds from the barrier before the send to the end of the receive} on every rank (timed on
    ``dst``, shared by a broadcast).  A first small transfer opens the connection outside the timing."""
    payload = torch.zeros(n_bytes // 4)
    out = {}
    for src, dst in pairs:
        for size in (1024, payload.numel()):  # warm-up (connection set-up), then the timed transfer
            buf = payload[:size]
            dist.barrier()
            start = time.perf_counter()
            if dist.get_rank() == src:
                dist.send(buf, dst)
            elif dist.get_rank() == dst:
                dist.recv(buf, src)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.broadcast(elapsed, dst)
        out[f"{src}->{dst}"] = float(elapsed)
    return out


def allreduce_then_die(victim: int) -> float:
    """Every rank all-reduces a small tensor (the link works), then rank ``victim`` SIGKILLs itself and the
    others wait in a second all-reduce (which fails when the launcher stops them)."""
    x = torch.ones(1024)
    dist.all_reduce(x)
    if dist.get_rank() == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(x)
    return float(x[0])
