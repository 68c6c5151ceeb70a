"""Cluster descriptions for the planner, with presets of common GPU nodes, each number with its source.

* ``flops``: the vendor's dense bf16 peak (H100 / H200 SXM 989 TFLOP/s, A100 312 TFLOP/s: NVIDIA datasheets).
* ``memory_bytes``: the vendor's capacity read in GiB: HBM is built in binary sizes (an H100 SXM's "80GB" is
  5 stacks of 16 GiB), and the driver reports close to it (nvidia-smi: H100 SXM 81,559 MiB = 79.6 GiB,
  A100 80GB 81,920 MiB = 80 GiB, A100 40GB 40,960 MiB).  ``reserve_bytes`` (default 2 GiB) is held back for
  the CUDA context (~0.5 GiB), the driver's share and the caching allocator's fragmentation: a configuration
  fits when its modelled memory is at most ``usable_bytes = memory_bytes - reserve_bytes``.
* ``utilisation``: the fraction of peak FLOP/s a training step reaches (model FLOPs utilisation), a
  ``Utilisation(value, source)``: per-GPU presets from published large-scale runs (``UTILISATION``), or
  calibrated from a step measured on your machine (``pytrain.cost.utilisation_from_step``).
* links: NVLink all-reduce bus bandwidth as nccl-tests reports on such nodes, one NIC per GPU across nodes
  (400 Gb/s = 50 GB/s, 200 Gb/s = 25 GB/s); latencies are typical NCCL small-message values.  Calibrate
  your own with ``pytrain.cost.calibrate``.

Describe your own cluster with ``Cluster(...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict

from ._checks import count, real
from .collectives import Link

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Utilisation:
    """Fraction of peak FLOP/s a training step reaches (``value`` in (0, 1]) and where that number comes from."""

    value: float
    source: str

    def __post_init__(self):
        real("utilisation", self.value, strict=True, maximum=1.0)
        if not (isinstance(self.source, str) and self.source.strip()):
            raise ValueError("a utilisation needs its source (where the number comes from), got an empty one")

    def __str__(self) -> str:
        return f"{self.value:.0%} of peak ({self.source})"


#: model FLOPs utilisation by GPU, from published training runs of large transformers
UTILISATION: Dict[str, Utilisation] = {
    "H100": Utilisation(0.40, "preset: Llama 3 pre-training on 8K-16K H100 SXM, 38-43% bf16 MFU "
                              "(Dubey et al. 2024, Table 4)"),
    "H200": Utilisation(0.40, "preset: the H100's figure (same Hopper compute and 989 TFLOP/s peak; "
                              "no published large-scale H200 MFU)"),
    "A100": Utilisation(0.45, "preset: Megatron-LM GPT runs on 32-3072 A100s, 44-52% of peak "
                              "(Narayanan et al. 2021, Table 1)"),
}


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``gpus_per_node`` devices of ``flops`` peak FLOP/s (the training dtype) and ``memory_bytes``
    each (the vendor's capacity, ``reserve_bytes`` of it not usable by tensors); ``intra`` / ``inter``: links
    inside a node and between nodes (per device); ``utilisation``: the fraction of ``flops`` reached."""

    name: str
    gpus_per_node: int
    nodes: int
    flops: float
    memory_bytes: float
    intra: Link
    inter: Link
    utilisation: Utilisation
    reserve_bytes: float = 2 * GiB

    def __post_init__(self):
        if not isinstance(self.utilisation, Utilisation):
            raise TypeError(f"utilisation must be a pytrain.cost.Utilisation(value, source), "
                            f"got {type(self.utilisation).__name__}")
        for name in ("intra", "inter"):
            if not isinstance(getattr(self, name), Link):
                raise TypeError(f"{name} must be a pytrain.cost.Link, got {type(getattr(self, name)).__name__}")
        for name in ("gpus_per_node", "nodes"):  # stored as plain ints (a numpy count would multiply in int64)
            object.__setattr__(self, name, count(name, getattr(self, name)))
        real("flops", self.flops, strict=True, unit="FLOP/s")
        real("memory_bytes", self.memory_bytes, strict=True)
        if not real("reserve_bytes", self.reserve_bytes) < self.memory_bytes:
            raise ValueError(f"reserve_bytes must be in [0, memory_bytes), got {self.reserve_bytes!r}")

    @property
    def devices(self) -> int:
        """nodes x GPUs per node."""
        return self.gpus_per_node * self.nodes

    @property
    def usable_bytes(self) -> float:
        """Device memory a configuration may fill: ``memory_bytes - reserve_bytes``."""
        return self.memory_bytes - self.reserve_bytes

    @property
    def rate(self) -> float:
        """FLOP/s reached per device: ``flops x utilisation``."""
        return self.flops * self.utilisation.value


NVLINK4, NVLINK3 = Link(3e-6, 1 / (360 * GB)), Link(4e-6, 1 / (230 * GB))  # H100 / A100 nodes, per GPU
PRESETS: Dict[str, Cluster] = {
    "8xH100-400G": Cluster("8xH100-400G", 8, 1, 989e12, 80 * GiB, NVLINK4, Link(8e-6, 1 / (50 * GB)),
                           UTILISATION["H100"]),
    "8xH200-400G": Cluster("8xH200-400G", 8, 1, 989e12, 141 * GiB, NVLINK4, Link(8e-6, 1 / (50 * GB)),
                           UTILISATION["H200"]),
    "8xA100-200G": Cluster("8xA100-200G", 8, 1, 312e12, 80 * GiB, NVLINK3, Link(10e-6, 1 / (25 * GB)),
                           UTILISATION["A100"]),
    "8xA100-40G-100G": Cluster("8xA100-40G-100G", 8, 1, 312e12, 40 * GiB, NVLINK3, Link(12e-6, 1 / (12.5 * GB)),
                               UTILISATION["A100"]),
}


def get_cluster(name: str, nodes: int = 1, utilisation: Utilisation | None = None) -> Cluster:
    """The preset ``name`` (one of ``PRESETS``) with ``nodes`` nodes, and ``utilisation`` instead of the
    preset's when given (e.g. from ``utilisation_from_step``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown cluster preset {name!r}; one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    return replace(preset, nodes=nodes, utilisation=utilisation if utilisation is not None else preset.utilisation)
