"""Trainers on torch.distributed: data parallel (``DDPTrainer``), fully sharded data parallel (``FSDPTrainer``,
on FSDP2), pipeline parallel (``PipelineTrainer``), launch helpers, checkpoints and the fault watchdog.

    from pytrain.trainers import DDPTrainer, spawn, init_distributed
"""
from .checkpoint import CheckpointError, DirectoryLock, atomic_save, load_checkpoint
from .ddp import DDPTrainer
from .emulated_link import EmulatedLink
from .fsdp import FSDPTrainer, shard_model
from .launch import DistInfo, SpawnError, init_distributed, spawn, spawn_on_link
from .metrics import JsonLogger, ProgressBar, TrainSummary
from .pipeline import PipelineTrainer
from .watchdog import RankFailure, Watchdog

__all__ = ["CheckpointError", "DirectoryLock", "atomic_save", "load_checkpoint", "DDPTrainer", "FSDPTrainer", "shard_model", "DistInfo",
           "SpawnError", "init_distributed", "spawn", "spawn_on_link", "EmulatedLink",
           "JsonLogger", "ProgressBar", "TrainSummary", "PipelineTrainer",
           "RankFailure", "Watchdog"]
