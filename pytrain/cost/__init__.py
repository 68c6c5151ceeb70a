"""Analytical cost models of distributed training, in SI units (bytes, seconds, FLOP/s).

* collectives: alpha-beta costs of ring / tree / Rabenseifner / hierarchical all-reduce, reduce-scatter,
  all-gather, all-to-all; the bytes each rank sends (``bytes_sent``, also counted by ``pytrain.comm``'s hooks);
  nccl-tests' algbw / busbw.
* calibrate: time collectives on a real ``torch.distributed`` group and fit the link's alpha and beta.
* ddp: bucketed all-reduce overlapped with the backward pass, compression, comm/compute ratio.
* pipeline: bubble fractions (GPipe, 1F1B, interleaved), in-flight activations, p2p bytes, step time.
* memory: params, grads, optimizer state (incl. int8 states), DDP buckets, transformer activations (stored and
  the step's peak; tensor parallel; output layer), ZeRO 1-3; a peak memory meter for CPU tensors.
* tensor_parallel: Megatron per-layer traffic; plan / clusters: ranked DP x PP x TP layouts on presets, each
  marked "runs with pytrain" or "model only", with utilisation presets (``UTILISATION``) or a measured one.
* report: ``Record`` (a dataclass that reads like a dict) and ``BubbleReport``.
"""
from .calibrate import Calibration, calibrate, fit_link, measure_collective
from .clusters import PRESETS, UTILISATION, Cluster, Utilisation, get_cluster
from .collectives import (Link, algbw, all_gather, all_to_all, busbw, bytes_sent, hierarchical_allreduce,
                          rabenseifner_allreduce, reduce_scatter, ring_allreduce, tree_allreduce)
from .ddp import DDPStepEstimate, bucket_sizes, ddp_step
from .memory import (MemoryEstimate, PeakMemory, activation_memory, activation_peak, fsdp_unsharded,
                     memory_per_device, optimizer_state_bytes)
from .pipeline import bubble_fraction, inflight_microbatches, load_balance, p2p_bytes, pipeline_step
from .plan import PlanConfig, plan, training_flops, utilisation_from_step
from .report import BubbleReport, Record
from .tensor_parallel import tp_layer_bytes, tp_layer_comm

__all__ = ["Calibration", "calibrate", "fit_link", "measure_collective", "PRESETS", "UTILISATION", "Cluster",
           "Utilisation", "get_cluster", "Link",
           "algbw", "all_gather", "all_to_all", "busbw", "bytes_sent", "hierarchical_allreduce", "rabenseifner_allreduce",
           "reduce_scatter", "ring_allreduce", "tree_allreduce", "DDPStepEstimate", "bucket_sizes", "ddp_step",
           "MemoryEstimate", "PeakMemory", "activation_memory", "activation_peak", "fsdp_unsharded",
           "memory_per_device", "optimizer_state_bytes",
           "bubble_fraction", "inflight_microbatches", "load_balance", "p2p_bytes", "pipeline_step", "PlanConfig",
           "plan", "training_flops", "utilisation_from_step", "BubbleReport", "Record",
           "tp_layer_bytes", "tp_layer_comm"]
