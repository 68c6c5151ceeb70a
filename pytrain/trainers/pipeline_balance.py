"""Balancing pipeline stages: per-layer time measurement and the contiguous min-max partition.

A pipeline runs at the pace of its slowest stage, so the layers (in order) are cut into contiguous
groups that minimise the largest group cost (the "linear partition" problem; the dynamic programme
of Skiena, The Algorithm Design Manual, sec. 8.5, O(k n^2) for n layers and k stages):

    best[j][i] = min over s < i of max(best[j-1][s], cost[s] + ... + cost[i-1])

The cost of a layer is its fastest measured forward + backward time on one example micro-batch (GPipe,
Huang et al. 2019, balance partitions the same way with profiled times).
"""
from __future__ import annotations

import time
from typing import List, Sequence

import torch
from torch import Tensor, nn


def partition(costs: Sequence[float], n_parts: int) -> List[int]:
    """Split points for cutting ``costs`` (one per layer, in order) into ``n_parts`` contiguous groups.

    Returns the ``n_parts - 1`` indices where groups 1..n_parts-1 start, chosen so that the largest
    group sum is as small as possible (ties: the earliest cuts).  Every group holds at least one layer.
    """
    n = len(costs)
    if n_parts < 1 or n_parts > n:
        raise ValueError(f"cannot cut {n} layers into {n_parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: smallest max-group cost cutting the first i layers into j groups; cut[j][i]: last cut
    best = [[inf] * (n + 1) for _ in range(n_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0.0
    for j in range(1, n_parts + 1):
        for i in range(j, n - (n_parts - j) + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    points, i = [], n
    for j in range(n_parts, 1, -1):
        i = cut[j][i]
        points.append(i)
    return points[::-1]


def _clock(device: torch.device) -> float:
    """Seconds on a clock that advances with this process's work on ``device``.

    CUDA: wall time after a synchronize.  CPU with one intra-op thread (as launched, one process
    per core): process CPU time, which time spent descheduled by other processes does not inflate;
    with more threads, wall time (idle OpenMP threads spin and would count as work).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def _forward_backward(layer: nn.Module, x: Tensor) -> Tensor:
    inp = x.detach().requires_grad_(x.is_floating_point())
    out = layer(inp)
    if out.requires_grad:
        out.backward(torch.ones_like(out))
    return out.detach()


def layer_times(layers: Sequence[nn.Module], example: Tensor, repeats: int = 5) -> List[float]:
    """Fastest of ``repeats`` forward + backward seconds of each layer, fed the previous layer's output.

    ``example`` is one micro-batch for the first layer.  One untimed pass first pays the one-off
    costs (allocator, autograd engine start-up); the fastest repeat is the least disturbed by other
    processes; on the CPU the times are CPU seconds (see ``_clock``).  Gradients the measurement
    leaves behind are cleared, buffers and the RNG state restored, so training afterwards is unaffected.
    """
    buffers = [(b, b.detach().clone()) for layer in layers for b in layer.buffers()]  # e.g. BatchNorm stats
    with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
        x = example
        for layer in layers:
            x = _forward_backward(layer, x)
        times, x = [], example
        for layer in layers:
            samples = []
            for _ in range(repeats):
                start = _clock(example.device)
                out = _forward_backward(layer, x)
                samples.append(_clock(example.device) - start)
            times.append(min(samples))
            layer.zero_grad(set_to_none=True)
            x = out
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    return times
