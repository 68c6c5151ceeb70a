"""Fully sharded data parallel training on FSDP2 (``torch.distributed.fsdp.fully_shard``).

``shard_model(model, blocks)`` applies ``fully_shard`` to each block (a transformer layer) and then to the root,
so each block's parameters are all-gathered just before its forward (and backward) and its gradients
reduce-scattered right after its backward; with ``reshard_after_forward`` (default) the gathered parameters are
freed after each block's forward and gathered again for its backward (less memory, one more all-gather per block).
Every parameter becomes a DTensor holding this rank's Shard(0) slice: build the optimizer after sharding.
pytrain's fused optimizers step DTensor params (``pytrain.optim._sharded``: local shards, norms reduced over
the mesh).

``FSDPTrainer`` is ``DDPTrainer`` (same data order, accumulation, clipping, schedules, evaluation, logs, watchdog)
on a sharded model: the step is the same maths, since the reduce-scatter averages gradients as DDP's all-reduce
does.  Accumulation steps skip the reduce-scatter (``set_requires_gradient_sync(False)``).  Not supported, each
with a clear error: DDP communication hooks (FSDP reduce-scatters gradients itself) and fp16 (its gradient
scaler would need the non-finite check reduced over the shards; use bf16).

Checkpoints are sharded (``sharded_checkpoint``: ``step-<step>.dcp`` directories written with
``torch.distributed.checkpoint`` through ``get_state_dict`` / ``set_state_dict``, published atomically) and
resume on any number of ranks: a run saved on 4 processes continues on 2 with the same global batches, since
the samplers split one shuffled order by rank (a step's global batch is the same whatever the world size) and
the position is counted in global batches.  RNG states are per rank: rank r resumes rank r's streams when the
checkpoint has them (more ranks than before: the new ones keep their seeded streams).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from . import checkpoint as ckpt
from . import sharded_checkpoint as sc
from . import state as st
from .ddp import DDPTrainer

CHECKPOINT_FORMAT = "pytrain.fsdp/1"


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], *, reshard_after_forward: bool = True,
                mesh=None) -> nn.Module:
    """``fully_shard`` each of ``blocks`` (submodules of ``model``), then ``model``; returns ``model`` (sharded in
    place: its parameters are now DTensors).  ``mesh``: a 1-D device mesh (default: all ranks)."""
    blocks = list(blocks)
    if isinstance(model, FSDPModule):
        raise ValueError("shard_model: the model is already sharded (fully_shard was applied to it)")
    inside = {id(m) for m in model.modules()}
    stray = [type(b).__name__ for b in blocks if id(b) not in inside]
    if stray:
        raise ValueError(f"shard_model: blocks must be submodules of the model; got {', '.join(stray)} outside it")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


class FSDPTrainer(DDPTrainer):
    """``DDPTrainer`` on a model sharded by ``shard_model`` (see the module doc); same arguments, except
    ``comm_hook`` (must be None) and ``precision`` ("fp32" or "bf16").  ``optimizer`` must be built on the
    sharded model's parameters.  ``data_mesh``: the 1-D mesh the model was sharded over, when it is not all
    ranks (with tensor parallelism on the other dim of a 2-D mesh): the global batch is split over its ranks,
    and the ranks of one tensor-parallel group get the same samples."""

    checkpoint_suffix = sc.SUFFIX

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, train_data, *,
                 comm_hook=None, precision: str = "fp32", data_mesh=None, **kwargs):
        if not isinstance(model, FSDPModule):
            raise ValueError(f"FSDPTrainer: the model must be sharded first (shard_model or fully_shard), got a plain "
                             f"{type(model).__name__}; then build the optimizer on its (DTensor) parameters")
        own = {id(p) for p in model.parameters()}
        foreign = sum(id(p) not in own for group in optimizer.param_groups for p in group["params"])
        if foreign:
            raise ValueError(f"FSDPTrainer: {foreign} of the optimizer's parameters are not the sharded model's; "
                             "build the optimizer after sharding the model")
        if comm_hook is not None:
            raise ValueError(f"FSDPTrainer: comm_hook {comm_hook!r} is a DDP gradient-communication hook; FSDP "
                             "reduce-scatters gradients itself: pass comm_hook=None")
        if precision == "fp16":
            raise ValueError("FSDPTrainer: precision 'fp16' is not supported (its gradient scaler is not "
                             "shard-aware); use 'bf16' or 'fp32'")
        if data_mesh is not None and data_mesh.ndim != 1:
            raise ValueError(f"FSDPTrainer: data_mesh must be a 1-D device mesh, got {data_mesh.ndim} dims")
        self._data_mesh = data_mesh
        super().__init__(model, optimizer, loss_fn, train_data, precision=precision, **kwargs)

    def _data_parallel(self):
        if self._data_mesh is None:
            return super()._data_parallel()
        return self._data_mesh.size(), self._data_mesh.get_local_rank()

    def _wrap(self, bucket_cap_mb: float) -> nn.Module:
        return self.model  # fully_shard made the model its own wrapper

    @contextmanager
    def _no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------------------------ checkpoints
    def _sharded_state(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def state_dict(self) -> dict:
        """{"model", "optim"}: sharded state dicts (``get_state_dict``), and "trainer": the rest, with every rank's
        RNG streams (collective: call on every rank)."""
        ranks = [None] * self.world_size
        dist.all_gather_object(ranks, st.rng_state())
        trainer = {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                   "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                   "batch_size": self.batch_size, "grad_accum": self.grad_accum, "precision": self.precision,
                   "optimizer_class": st.optimizer_class(self.optimizer),
                   "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                   "early_stopping": {"best_val": self.best_val, "bad_evals": self.bad_evals}, "ranks": ranks}
        return {**self._sharded_state(), "trainer": trainer}

    def save_checkpoint(self) -> Optional[Path]:
        """Writes ``step-<step>.dcp`` atomically (``sharded_checkpoint.save_sharded``) and prunes to ``keep_last``
        (collective); takes the directory's lock again if ``fit`` released it."""
        path = self.checkpoint_dir / ckpt.checkpoint_name(self.step, sc.SUFFIX)

        def hold() -> None:
            error = self._hold_directory()
            if error is not None:
                raise error

        state = self.state_dict()
        trainer = state.pop("trainer")
        sc.save_sharded(state, trainer, path, keep_last=self.keep_last, prepare=hold)
        self._saved_step = self.step
        return path

    def _resume(self, path: Path) -> None:
        meta, loaded = sc.load_sharded(path, self._sharded_state())
        self.load_state_dict({**loaded, "trainer": meta}, source=str(path))

    def _check_compatible(self, state: dict, source: str) -> None:
        meta = state["trainer"]
        st.check_format(meta, CHECKPOINT_FORMAT, source, "FSDPTrainer")
        st.check_counters(meta, source, {"step": (0, math.inf), "epoch": (0, math.inf),
                                         "batch_in_epoch": (0, self.steps_per_epoch + 1)})
        for key, mine in (("batch_size", self.batch_size), ("grad_accum", self.grad_accum),
                          ("precision", self.precision), ("optimizer_class", st.optimizer_class(self.optimizer))):
            if meta.get(key) != mine:
                raise ckpt.CheckpointError(f"{source}: written with {key}={meta.get(key)!r}, this run has "
                                           f"{key}={mine!r}; resume with the same setting")
        if (meta["scheduler"] is None) != (self.scheduler is None):
            raise ckpt.CheckpointError(f"{source}: checkpoint {'has no' if meta['scheduler'] is None else 'has a'} "
                                       "LR scheduler state, this run does the opposite")
        st.check_finite(sc.local_tensors(state["model"]), source, "model")
        st.check_finite(sc.local_tensors(state["optim"]), source, "optimizer state")

    def _snapshot(self) -> dict:
        return {**self._sharded_state(), "trainer": {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ranks": {self.info.rank: st.rng_state()}}}

    def _apply(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = state["trainer"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        ranks = meta["ranks"]
        rng = ranks.get(self.info.rank) if isinstance(ranks, dict) else \
            ranks[self.info.rank] if self.info.rank < len(ranks) else None
        if rng is not None:
            st.set_rng_state(rng)

    def load_state_dict(self, state: Optional[dict], source: str = "checkpoint") -> None:
        """Restores a ``state_dict()`` (collective; all or nothing, as ``DDPTrainer.load_state_dict``)."""
        meta = state["trainer"]
        counters = {key: meta.get(key) for key in ("step", "epoch", "batch_in_epoch", "early_stopping")}
        super().load_state_dict({**state, **counters}, source)
