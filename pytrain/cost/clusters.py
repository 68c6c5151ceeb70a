"""Cluster descriptions for the planner, with presets of common GPU nodes.

Preset numbers are vendor peak figures (dense bf16 FLOP/s, HBM capacity) and typical measured link
figures: NVLink all-reduce bus bandwidth as nccl-tests reports on such nodes, and one NIC per GPU
(400 Gb/s = 50 GB/s, 200 Gb/s = 25 GB/s) across nodes; latencies are typical NCCL small-message
values.  ``efficiency`` is the fraction of peak FLOP/s that large-model training reaches (model FLOPs
utilisation, ~0.4-0.5 on these GPUs: Chowdhery et al. 2022, Narayanan et al. 2021).  Describe your
own cluster with ``Cluster(...)``, or calibrate its links with ``pytrain.cost.calibrate``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict

from .collectives import Link

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``gpus_per_node`` devices of ``flops`` peak FLOP/s (the training dtype) and
    ``memory_bytes`` each; ``intra`` / ``inter``: links inside a node and between nodes (per device)."""

    name: str
    gpus_per_node: int
    nodes: int
    flops: float
    memory_bytes: float
    intra: Link
    inter: Link
    efficiency: float = 0.45

    def __post_init__(self):
        if not (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 1
                and isinstance(self.nodes, int) and self.nodes >= 1):
            raise ValueError(f"gpus_per_node and nodes must be ints >= 1, got {self.gpus_per_node!r}, {self.nodes!r}")
        if not (self.flops > 0 and self.memory_bytes > 0 and 0 < self.efficiency <= 1):
            raise ValueError("flops and memory_bytes must be > 0 and efficiency in (0, 1]")

    @property
    def devices(self) -> int:
        """nodes x GPUs per node."""
        return self.gpus_per_node * self.nodes


NVLINK4, NVLINK3 = Link(3e-6, 1 / (360 * GB)), Link(4e-6, 1 / (230 * GB))  # H100 / A100 nodes, per GPU
PRESETS: Dict[str, Cluster] = {
    "8xH100-400G": Cluster("8xH100-400G", 8, 1, 989e12, 80 * GB, NVLINK4, Link(8e-6, 1 / (50 * GB))),
    "8xH200-400G": Cluster("8xH200-400G", 8, 1, 989e12, 141 * GB, NVLINK4, Link(8e-6, 1 / (50 * GB))),
    "8xA100-200G": Cluster("8xA100-200G", 8, 1, 312e12, 80 * GB, NVLINK3, Link(10e-6, 1 / (25 * GB))),
    "8xA100-40G-100G": Cluster("8xA100-40G-100G", 8, 1, 312e12, 40 * GB, NVLINK3, Link(12e-6, 1 / (12.5 * GB))),
}


def get_cluster(name: str, nodes: int = 1) -> Cluster:
    """The preset ``name`` (one of ``PRESETS``) with ``nodes`` nodes."""
    if name not in PRESETS:
        raise ValueError(f"unknown cluster preset {name!r}; one of {sorted(PRESETS)}")
    return replace(PRESETS[name], nodes=nodes)
