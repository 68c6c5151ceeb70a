"""Per-rank memory of a real training step against ``pytrain.cost``'s memory model (DDP, FSDP2, TP, DP x TP).

``measure(setups)`` runs on every rank of a ``pytrain.trainers.spawn`` launch (gloo, CPU): for each ``Setup`` it
builds ``pytrain.train.GPT`` (fp32, flash attention, no dropout), wraps it as ``pytrain train`` does (DDP:
``DistributedDataParallel`` with its default buckets; FSDP: ``shard_model`` per block over the data-parallel
mesh dim; TP: ``pytrain.train.tensor_parallel`` on the tensor-parallel dim, then FSDP over the data-parallel
dim), steps ``FusedAdamW`` three times on random tokens (``zero_grad(set_to_none=False)``: gradients stay
resident between steps; DDP rebuilds its buckets in the second step's forward, so the third is measured) and
reads, on this rank, everything under one ``PeakMemory`` entered before the model exists:

* params / grads / optimizer: bytes of the distinct storages of the parameters', gradients' and optimizer
  states' (step counts included) local tensors (DTensors: their local shards) after the last step;
* buckets: tracked live bytes after the last step minus those three and the step's inputs (DDP: its
  gradient buckets; FSDP / TP: what the sharding keeps besides its shards);
* activations: live bytes after the last step's forward (the loss computed, the logits dropped) minus
  before it, i.e. what the forward left for the backward;
* activation peak: the peak of live bytes during the last step's forward and backward minus before it.

``predict(setup, world)`` gives the same quantities from ``pytrain.cost.memory`` (``memory_per_device``,
``activation_memory``) and the model's shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from ..cost.memory import PeakMemory, activation_memory, fsdp_unsharded, memory_per_device
from ..optim import FusedAdamW
from ..train import GPT, lm_loss, tensor_parallel

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8"}
#: parameters of these submodules of each block are split by tensor parallelism; the rest is replicated
TP_SPLIT = ("qkv", "proj", "mlp.0", "mlp.2")
STEPS = 3  # the last one is measured
#: what ``measure`` and ``predict`` report, bytes per rank
QUANTITIES = ("params", "grads", "buckets", "optimizer", "activations", "activation_peak")


@dataclass(frozen=True)
class Setup:
    """One measured configuration: ``strategy`` ddp / fsdp / tp (TP on ``tp`` ranks, FSDP over the others),
    optimizer state dtype, activation checkpointing, and the GPT's shape (``micro_batch`` sequences per rank,
    per tensor-parallel group with TP)."""

    strategy: str
    state_dtype: str = "fp32"
    checkpointing: bool = False
    tp: int = 1
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    seq: int = 256
    micro_batch: int = 4
    vocab: int = 64

    def __post_init__(self):
        if self.strategy not in ("ddp", "fsdp", "tp"):
            raise ValueError(f"Setup: strategy must be ddp, fsdp or tp, got {self.strategy!r}")
        if (self.strategy == "tp") != (self.tp > 1):
            raise ValueError(f"Setup: strategy tp needs tp > 1 and the others tp = 1, got {self.strategy} tp={self.tp}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"Setup: state_dtype must be one of {sorted(STATE_DTYPES)}, got {self.state_dtype!r}")

    def model(self) -> GPT:
        return GPT(self.vocab, self.layers, self.hidden, self.heads, self.seq,
                   activation_checkpointing=self.checkpointing)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (local shards of DTensors)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _wrap(setup: Setup, model: GPT, world: int) -> nn.Module:
    if setup.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh

    from ..trainers import shard_model

    mesh = init_device_mesh("cpu", (world // setup.tp, setup.tp), mesh_dim_names=("dp", "tp"))
    if setup.tp > 1:
        tensor_parallel(model, mesh["tp"])
    return shard_model(model, model.blocks, mesh=mesh["dp"])


def _measure_one(setup: Setup) -> Dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    group = rank // setup.tp  # the ranks of one tensor-parallel group train on the same tokens
    tokens = torch.Generator().manual_seed(group)
    with PeakMemory() as mem:
        torch.manual_seed(0)
        model = _wrap(setup, setup.model(), world)
        optimizer = FusedAdamW(model.parameters(), lr=1e-3, state_dtype=STATE_DTYPES[setup.state_dtype])
        x, y = torch.randint(0, setup.vocab, (2, setup.micro_batch, setup.seq), generator=tokens)
        for _ in range(STEPS):
            base = mem.current
            mem.peak = base
            logits = model(x)
            loss = lm_loss(logits, y)
            del logits
            after_forward = mem.current - base
            loss.backward()
            peak = mem.peak - base
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        params = list(model.parameters())
        out = {"params": _storage_bytes(params),
               "grads": _storage_bytes(p.grad for p in params if p.grad is not None),
               "optimizer": _storage_bytes(t for state in optimizer.state.values() for t in state.values()
                                           if isinstance(t, torch.Tensor)),
               "activations": after_forward, "activation_peak": peak}
        out["buckets"] = mem.current - out["params"] - out["grads"] - out["optimizer"] - _storage_bytes([x, y])
    return out


def measure(setups: List[Setup]) -> List[Dict[str, float]]:
    """This rank's measured bytes for each of ``setups`` (see the module docstring), in order."""
    return [_measure_one(setup) for setup in setups]


def param_counts(setup: Setup) -> Dict[str, int]:
    """Parameters of the GPT: split by tensor parallelism (the blocks' linears), replicated (the rest), and of
    those the root module's own (outside the blocks: embeddings, final norm)."""
    model = setup.model()
    split = sum(p.numel() for block in model.blocks for name in TP_SPLIT
                for p in block.get_submodule(name).parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"split": split, "replicated": total - split,
            "root": total - sum(p.numel() for p in model.blocks.parameters())}


def predict(setup: Setup, world: int) -> Dict[str, float]:
    """The model's bytes per rank for ``setup`` on ``world`` processes, keyed as ``measure``'s results.

    Parameters per rank: the TP-split ones / t plus the replicated ones, then ZeRO-3 over the dp = world / t
    data-parallel ranks for FSDP and TP (``memory_per_device``); DDP's buckets are a second copy of the
    gradients.  Activations: ``activation_memory`` of the GPT's shapes (flash attention, fp32, no dropout,
    the output layer with its vocabulary; recompute "full" with checkpointing), and the step's peak
    ``activation_peak`` (through ``memory_per_device``) plus the gradients its peak node (the last block's
    second MLP linear) creates, ``4 (4 h^2 / t + h)`` bytes (DDP adds them into ``.grad`` after the node,
    FSDP2 keeps them unsharded until the block's reduce-scatter); FSDP / TP add what FSDP2 holds unsharded at
    that point (``fsdp_unsharded``).  After the forward FSDP2 holds nothing unsharded: ``shard_model`` reshards
    every module after its forward, the root included."""
    counts = param_counts(setup)
    n_params = counts["split"] // setup.tp + counts["replicated"]  # t divides the heads, so every split dim
    dp = world // setup.tp
    acts = dict(seq=setup.seq, micro_batch=setup.micro_batch, hidden=setup.hidden, heads=setup.heads,
                layers=setup.layers, bytes_per_element=4, dropout=False, flash=True, tp=setup.tp,
                vocab=setup.vocab, recompute="full" if setup.checkpointing else "none")
    sharded = setup.strategy != "ddp"
    est = memory_per_device(n_params, state_dtype=setup.state_dtype, zero_stage=3 if sharded else 0, dp=dp,
                            ddp_buckets=not sharded, activations=acts)
    h, t = setup.hidden, setup.tp
    at_peak = 4.0 * (4 * h * h / t + h)
    if sharded:
        block = (counts["split"] // t + counts["replicated"] - counts["root"]) / setup.layers
        at_peak += fsdp_unsharded(block, counts["root"])
    grads = est.grads if sharded else est.grads / 2  # DDP: .grad and the buckets, one copy each
    return {"params": est.params, "grads": grads, "optimizer": est.optimizer, "buckets": est.grads - grads,
            "activations": activation_memory(**acts), "activation_peak": est.activations + at_peak}
