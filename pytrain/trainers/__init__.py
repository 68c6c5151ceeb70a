"""Trainers on torch.distributed: data parallel (``DDPTrainer``), pipeline parallel (``PipelineTrainer``),
launch helpers and checkpoints.

    from pytrain.trainers import DDPTrainer, spawn, init_distributed
"""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .ddp import DDPTrainer
from .launch import DistInfo, SpawnError, init_distributed, spawn
from .metrics import JsonLogger, ProgressBar
from .pipeline import PipelineTrainer

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "DDPTrainer", "DistInfo", "SpawnError",
           "init_distributed", "spawn", "JsonLogger", "ProgressBar", "PipelineTrainer"]
