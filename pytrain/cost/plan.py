"""Planner: enumerate DP x PP x TP layouts, micro-batching, recompute, ZeRO and gradient compression for a
transformer on a cluster; predict step time and memory per device; rank.

For a layout (d, p, t) with d p t = devices, micro-batch b and m = B / (d b) micro-batches per step:

    FLOPs per step   F = 6 N B s + 12 L B s^2 h   (Kaplan et al. 2020: 6 per parameter per token, forward
                     + backward; plus attention scores and values), x 4/3 with full recompute
    compute          c = F / (d p t) / (flops * utilisation);  pipeline (1F1B): c (1 + (p-1)/m)
                     (utilisation: the cluster's ``Utilisation``, a per-GPU preset with its source or
                     ``utilisation_from_step`` of a step measured on your machine)
    tensor parallel  m * (L/p) * tp_layer_comm(s, b, h, t)       on the intra-node link (t <= GPUs per node)
    pipeline p2p     (m + p - 1) * 2 (alpha + s b h e / t * beta)  per boundary slot (scatter/gather of the
                     activation over t: Narayanan et al. 2021), inter-node when p t spans nodes
    data parallel    ddp_step's bucketed all-reduce of N/(p t) gradients (e bytes, x compression ratio)
                     overlapped with the backward: ring on the intra link when d p t fits a node, ring on the
                     inter link when p t fills a node, else hierarchical (g = GPUs per node / (p t))
    memory           memory_per_device(N/(p t), bf16 params and grads, fp32 masters, optimizer state,
                     ZeRO over d) + activation_memory(s, b, h, a, L/p) / t x in-flight micro-batches

Configurations that do not fit in the device's usable memory (``Cluster.usable_bytes``) are dropped; a
compressed variant is kept only where it is at least 1% faster than the same layout uncompressed (where the
all-reduce is hidden behind the backward, compression only costs accuracy); the rest are
sorted by predicted step time (equal to 3 significant digits: less compression first, then what pytrain's
trainers run, then less memory).

ZeRO-3 is FSDP: the parameters are all-gathered for the forward and again for the backward, and the gradients
reduce-scattered, ``3 (p - 1) / p`` of the parameter bytes per rank against the all-reduce's ``2 (p - 1) / p``
(Rajbhandari et al. 2020, section 7.2.3: 1.5x data parallelism's volume).  It is modelled as DDP's buckets
overlapped with the backward, carrying 1.5x the bytes (FSDP prefetches the forward's all-gathers behind the
forward, which this leaves out).

Every configuration says whether pytrain's trainers run it today (``runs_with_pytrain``, ``support``):
data parallel (with a compression hook) is ``DDPTrainer``, pipeline x data parallel is ``PipelineTrainer``
(1F1B; its data-parallel all-reduce runs after the schedule, not overlapped with the backward as modelled
here, which ``pytrain_step_s`` and ``support`` add back; it takes no compression hook), ZeRO-3 (and tensor
parallel x ZeRO-3 on a 2-D mesh) is ``FSDPTrainer`` (FSDP2; no compression hook); ZeRO-1/2, tensor
parallelism without ZeRO-3 and sharding with pipelines are modelled only.  Full recompute is the model's own
``torch.utils.checkpoint`` around each layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ._checks import count, real
from .clusters import Cluster, Utilisation
from .collectives import Link, hierarchical_allreduce, ring_allreduce
from .ddp import ddp_step
from .memory import (OPTIMIZER_STATES, RECOMPUTE, STATE_BYTES, MemoryEstimate, activation_memory,
                     memory_per_device)
from .pipeline import bubble_fraction, inflight_microbatches
from .tensor_parallel import tp_layer_comm

BYTES = 2  # bf16 parameters, gradients and activations (mixed precision)
MIN_GAIN = 0.01  # a compressed variant is listed when it is at least 1% faster than the layout uncompressed


@dataclass(frozen=True)
class PlanConfig:
    """One layout and its predictions: seconds per step and its parts, memory per device (bytes)."""

    dp: int
    pp: int
    tp: int
    micro_batch: int
    microbatches: int
    recompute: str
    zero_stage: int
    compression: float
    step_s: float
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_exposed_s: float
    bubble: float
    memory: MemoryEstimate
    tokens_per_s: float
    dp_comm_s: float = 0.0

    @property
    def pytrain_step_s(self) -> float:
        """The step as pytrain's trainers run this layout: ``PipelineTrainer`` all-reduces the data-parallel
        gradients after the schedule instead of overlapping them with the backward, so its step is
        ``step_s`` + the hidden part of ``dp_comm_s``; otherwise ``step_s``."""
        return self.step_s + (self.dp_comm_s - self.dp_exposed_s if self.pp > 1 and self.dp > 1 else 0.0)

    @property
    def support(self) -> str:
        """What runs this layout: ``"DDPTrainer"``, ``"DDPTrainer + compression hook"``, ``"PipelineTrainer"``,
        ``"FSDPTrainer"`` (ZeRO-3, with tensor parallel on a 2-D mesh), or ``"model only: ..."`` naming what no
        pytrain trainer runs yet (ZeRO-1/2, tensor parallel without ZeRO-3, ...)."""
        fsdp = self.zero_stage == 3
        missing = [name for name, needed in (
            ("tensor parallel without ZeRO-3", self.tp > 1 and not fsdp),
            (f"ZeRO-{self.zero_stage}", self.zero_stage in (1, 2)),
            ("sharding with pipelines", self.pp > 1 and (fsdp or self.tp > 1)),
            ("compression with pipelines", self.pp > 1 and self.compression < 1),
            ("compression with ZeRO-3", fsdp and self.compression < 1)) if needed]
        if missing:
            return "model only: " + ", ".join(missing) + " not in pytrain's trainers yet"
        if fsdp:
            return f"FSDPTrainer (x tensor parallel {self.tp})" if self.tp > 1 else "FSDPTrainer"
        if self.pp > 1:
            late = self.pytrain_step_s - self.step_s
            return f"PipelineTrainer (DP all-reduce after the schedule: +{late:.3g} s)" if late else "PipelineTrainer"
        return "DDPTrainer + compression hook" if self.compression < 1 else "DDPTrainer"

    @property
    def runs_with_pytrain(self) -> bool:
        """Whether one of pytrain's trainers runs this layout today (``support`` says which, or what is missing)."""
        return not self.support.startswith("model only")

    def describe(self) -> str:
        """One line naming the layout and its options."""
        return (f"dp={self.dp} pp={self.pp} tp={self.tp} b={self.micro_batch} m={self.microbatches} "
                f"recompute={self.recompute} zero={self.zero_stage} compression={self.compression:g}")

    def __repr__(self) -> str:
        return (f"PlanConfig({self.describe()}: step {self.step_s:.3f} s, {self.tokens_per_s:,.0f} tokens/s, "
                f"bubble {self.bubble:.1%}, {self.memory.total / 2**30:.1f} GiB/device; {self.support})")


def training_flops(n_params: float, layers: int, hidden: int, seq: int, batch: int, recompute: str = "none") -> float:
    """FLOPs of one training step: ``6 N B s + 12 L B s^2 h``, x 4/3 with full recompute (one more forward)."""
    n_params = real("n_params", n_params, strict=True)
    layers, hidden, seq, batch = (count(name, value) for name, value in (("layers", layers), ("hidden", hidden),
                                                                          ("seq", seq), ("batch", batch)))
    _choice("recompute", recompute, RECOMPUTE)
    flops = 6 * n_params * batch * seq + 12 * layers * batch * seq * seq * hidden
    return flops * (4 / 3 if recompute == "full" else 1.0)


def _choice(name: str, value, allowed) -> str:
    """``value``, after checking it is one of the strings ``allowed`` (ValueError naming ``name``)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _options(name: str, values, check) -> tuple:
    """The planner's option list ``values`` as a tuple of ``check(label, value)`` (which raises ValueError for
    a bad option and returns it as the models use it); a str, or an empty list, is refused."""
    try:
        options = tuple(values)
    except TypeError:
        options = None
    if options is None or isinstance(values, str):
        raise ValueError(f"{name} must be a sequence of options, got {values!r}")
    if not options:
        raise ValueError(f"{name} must hold at least one option, got {values!r}")
    return tuple(check(f"{name}[{i}]", value) for i, value in enumerate(options))


def _dp_allreduce(cluster: Cluster, dp: int, pp: int, tp: int):
    """(allreduce cost function, link) for the data-parallel ring given the rank layout (tp fastest, then pp)."""
    inner, g = pp * tp, cluster.gpus_per_node
    if dp * inner <= g:
        return ring_allreduce, cluster.intra
    if inner >= g:
        return ring_allreduce, cluster.inter
    per_node = g // inner
    return (lambda n, p, link: hierarchical_allreduce(n, per_node, p // per_node, cluster.intra, cluster.inter),
            cluster.inter)


#: ZeRO-3's bytes on the wire per step relative to data parallelism's all-reduce (module docstring)
ZERO3_TRAFFIC = 1.5


def _evaluate(n_params, layers, hidden, heads, seq, global_batch, cluster, dp, pp, tp, b, recompute, zero,
              compression, optimizer, state_dtype) -> PlanConfig:
    m = global_batch // (dp * b)
    compute = training_flops(n_params, layers, hidden, seq, global_batch, recompute) / (dp * pp * tp) / cluster.rate
    pipe_compute = compute * (1 + (pp - 1) / m)
    tp_comm = m * (layers // pp) * tp_layer_comm(seq, b, hidden, tp, cluster.intra) if tp > 1 else 0.0
    p2p_link: Link = cluster.inter if pp * tp > cluster.gpus_per_node else cluster.intra
    pp_comm = (m + pp - 1) * 2 * (p2p_link.alpha + seq * b * hidden * BYTES / tp * p2p_link.beta) if pp > 1 else 0.0
    allreduce, link = _dp_allreduce(cluster, dp, pp, tp)
    shard = int(n_params // (pp * tp))
    dp_est = ddp_step(int(shard * ZERO3_TRAFFIC) if zero == 3 else shard, compute_s=pipe_compute + tp_comm + pp_comm, world_size=dp, link=link,
                      bytes_per_element=BYTES, compression_ratio=compression, allreduce=allreduce)
    acts = activation_memory(seq, b, hidden, heads, layers // pp, bytes_per_element=BYTES, dropout=False,
                             recompute=recompute, flash=recompute != "full") / tp
    inflight = inflight_microbatches(pp, m, "1f1b") if pp > 1 else 1.0
    mem = memory_per_device(shard, param_bytes=BYTES, master_weights=True, optimizer=optimizer,
                            state_dtype=state_dtype, zero_stage=zero, dp=dp, activations=acts * inflight)
    step = dp_est.step_s
    return PlanConfig(dp, pp, tp, b, m, recompute, zero, compression, step, pipe_compute, tp_comm, pp_comm,
                      dp_est.exposed_comm_s, bubble_fraction(pp, m, "1f1b") if pp > 1 else 0.0, mem,
                      global_batch * seq / step, dp_est.comm_s)


def _divisors(n: int) -> List[int]:
    """The divisors of n, ascending."""
    return [k for k in range(1, n + 1) if n % k == 0]


def plan(model_params: float, layers: int, hidden: int, seq: int, global_batch: int, cluster: Cluster, *,
         heads: Optional[int] = None, micro_batches: Sequence[int] = (1, 2, 4, 8),
         recompute: Iterable[str] = ("none", "full"), zero_stages: Iterable[int] = (0, 1, 3),
         compression: Iterable[float] = (1.0, 0.5, 0.25), optimizer: str = "adamw", state_dtype: str = "fp32",
         include_oom: bool = False) -> List[PlanConfig]:
    """Every valid configuration ranked by predicted step time (fastest first); see the module docstring.

    Valid: dp pp tp = cluster devices, tp <= GPUs per node and divides heads and hidden, pp divides layers,
    the global batch splits into dp x micro_batch x m with m >= pp.  ``heads`` defaults to hidden / 128.
    Configurations over the device memory are left out unless ``include_oom`` (then listed after the
    fitting ones).  Raises ValueError when nothing is valid."""
    layers, hidden, seq, global_batch = (count(name, value) for name, value in (
        ("layers", layers), ("hidden", hidden), ("seq", seq), ("global_batch", global_batch)))
    heads = max(1, hidden // 128) if heads is None else count("heads", heads)
    model_params = real("model_params", model_params, strict=True)
    micro_batches = _options("micro_batches", micro_batches, count)
    recompute = _options("recompute", recompute, lambda name, v: _choice(name, v, RECOMPUTE))
    zero_stages = _options("zero_stages", zero_stages, lambda name, v: count(name, v, 0, 3))
    compression = _options("compression", compression, lambda name, v: real(name, v, strict=True, maximum=1.0))
    _choice("optimizer", optimizer, OPTIMIZER_STATES)
    _choice("state_dtype", state_dtype, STATE_BYTES)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a pytrain.cost.Cluster (see get_cluster), got {type(cluster).__name__}")
    n = cluster.devices
    configs = []
    for tp, pp in itertools.product(_divisors(n), _divisors(n)):
        dp = n // (tp * pp)
        if (dp * pp * tp != n or tp > cluster.gpus_per_node or heads % tp or hidden % tp or layers % pp):
            continue
        for b, rc, zero, comp in itertools.product(micro_batches, recompute, zero_stages, compression):
            if global_batch % (dp * b) or global_batch // (dp * b) < pp or (zero and dp == 1):
                continue
            if comp < 1 and dp == 1:
                continue
            configs.append(_evaluate(model_params, layers, hidden, heads, seq, global_batch, cluster, dp, pp, tp, b,
                                     rc, zero, comp, optimizer, state_dtype))
    if not configs:
        raise ValueError(f"no valid layout for {n} devices: global_batch={global_batch} must split into "
                         f"dp x micro_batch x m (m >= pp) with pp dividing layers={layers} and tp dividing "
                         f"heads={heads} and hidden={hidden}")
    ranked = sorted(_faster_compressed_only(configs), key=_rank_key)
    fits = [c for c in ranked if c.memory.total <= cluster.usable_bytes]
    return fits + [c for c in ranked if c.memory.total > cluster.usable_bytes] if include_oom else fits


def utilisation_from_step(step_s: float, n_params: float, layers: int, hidden: int, seq: int, batch: int,
                          peak_flops: float, *, devices: int = 1, recompute: str = "none",
                          where: str = "this machine") -> Utilisation:
    """The utilisation a measured training step reached: ``training_flops(...) / (step_s x devices x
    peak_flops)``, with its source (``where`` and the numbers) stated.  ``batch``: sequences per step over
    all ``devices``; ``peak_flops``: one device's peak in the training dtype.  Use a step of the model
    and precision you plan for, after warm-up, e.g. ``pytrain train``'s median step time."""
    step_s, n_params, peak_flops = (real(name, value, strict=True) for name, value in (
        ("step_s", step_s), ("n_params", n_params), ("peak_flops", peak_flops)))
    devices = count("devices", devices)
    achieved = training_flops(n_params, layers, hidden, seq, batch, recompute) / step_s / devices
    if achieved > peak_flops:
        raise ValueError(f"the step reached {achieved:.3g} FLOP/s per device, above peak_flops={peak_flops:.3g}: "
                         f"check the model description, step time and peak")
    return Utilisation(achieved / peak_flops, f"calibrated: {step_s:.4g} s per step of a {n_params:.3g}-parameter "
                                              f"model on {where} ({achieved / 1e12:.3g} of {peak_flops / 1e12:.3g} "
                                              f"TFLOP/s per device)")


def _faster_compressed_only(configs: List[PlanConfig]) -> List[PlanConfig]:
    """Drops each compressed configuration that is not at least ``MIN_GAIN`` faster than the same layout
    uncompressed: there the all-reduce is (nearly) hidden, and compression would only cost accuracy."""
    def layout(c: PlanConfig) -> tuple:
        return c.dp, c.pp, c.tp, c.micro_batch, c.recompute, c.zero_stage
    plain = {layout(c): c.step_s for c in configs if c.compression == 1.0}
    return [c for c in configs if c.compression == 1.0 or layout(c) not in plain
            or c.step_s < plain[layout(c)] * (1 - MIN_GAIN)]


def _rank_key(c: PlanConfig) -> tuple:
    """Fastest first (to 3 significant digits: closer is within the model's error); on a tie the less
    lossy compression, then a layout pytrain's trainers run, then the smaller memory."""
    return float(f"{c.step_s:.3g}"), -c.compression, not c.runs_with_pytrain, c.memory.total
