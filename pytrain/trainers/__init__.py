"""Trainers on torch.distributed: data parallel (``DDPTrainer``), pipeline parallel (``PipelineTrainer``),
launch helpers, checkpoints and the fault watchdog.

    from pytrain.trainers import DDPTrainer, spawn, init_distributed
"""
from .checkpoint import CheckpointError, DirectoryLock, atomic_save, load_checkpoint
from .ddp import DDPTrainer
from .launch import DistInfo, SpawnError, init_distributed, spawn
from .metrics import JsonLogger, ProgressBar, TrainSummary
from .pipeline import PipelineTrainer
from .watchdog import RankFailure, Watchdog

__all__ = ["CheckpointError", "DirectoryLock", "atomic_save", "load_checkpoint", "DDPTrainer", "DistInfo",
           "SpawnError", "init_distributed", "spawn", "JsonLogger", "ProgressBar", "TrainSummary", "PipelineTrainer",
           "RankFailure", "Watchdog"]
