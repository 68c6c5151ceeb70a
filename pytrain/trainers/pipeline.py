"""Pipeline-parallel training on ``torch.distributed.pipelining`` (gloo on CPU, NCCL on GPU).

The model's layers are cut into ``S = pp * v`` contiguous stages (``pp`` pipeline ranks, ``v``
virtual stages per rank for the interleaved schedule; stage ``j`` lives on pipeline rank ``j % pp``).
Each batch is split into ``m`` micro-batches that flow through the stages:

- GPipe (Huang et al. 2019, arXiv:1811.06965): all forwards, then all backwards; keeps ``m``
  micro-batches of activations.  Idle ("bubble") fraction of a step with equal stages:
  ``(pp - 1) / (m + pp - 1)``.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021, arXiv:2006.09668): after ``pp - rank`` warm-up
  forwards, alternate one forward and one backward; same bubble, at most ``pp`` micro-batches live.
- Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021, arXiv:2104.04473): ``v`` stages per rank
  shrink the bubble to ``(pp - 1) / (v * m + pp - 1)`` for more point-to-point messages.

The loss is averaged over micro-batches (``loss_fn`` must average over its batch), so the gradients
equal those of the unsplit model on the whole batch.  With ``dp_size > 1`` the world is a
``dp_size x pp`` grid (rank = dp_rank * pp + pp_rank): each pipeline replica trains on its own
batch and the gradients are averaged across replicas before the optimizer step.

The trainer times every stage's forward and backward compute; ``bubble_report()`` gives the
measured idle fraction next to the cost model's prediction.

Checkpoints (``save(directory)`` / ``load(directory)``): one file per pipeline rank, written atomically by
replica 0, with that rank's stages, optimizer, step count and stage layout, and the RNG streams of every
replica of the rank (``pytrain.trainers.state``, shared with ``DDPTrainer``).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from pytrain.cost.pipeline import SCHEDULES, bubble_fraction, load_balance, pipeline_step
from pytrain.cost.report import BubbleReport
from pytrain.trainers import state as st
from pytrain.trainers.checkpoint import CheckpointError, load_checkpoint
from pytrain.trainers.metrics import JsonLogger
from pytrain.trainers.pipeline_balance import layer_times, partition
from pytrain.trainers.tracking import RunLog, TensorBoardLog, peak_memory_bytes

CHECKPOINT_FORMAT = "pytrain.pipeline/1"
Layers = List[Tuple[str, nn.Module]]


def _named_layers(model) -> Layers:
    """(name, module) per layer: an ``nn.Sequential``'s children keep their names, a list gets 0, 1, ..."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return [(str(i), layer) for i, layer in enumerate(model)]
    raise TypeError(f"model must be an nn.Sequential or a list of layers, got {type(model).__name__}")


def _check_split_points(points: Sequence[int], n_layers: int, n_stages: int) -> List[int]:
    points = [int(p) for p in points]
    if len(points) != n_stages - 1:
        raise ValueError(f"{n_stages} stages need {n_stages - 1} split points, got {len(points)}: {points}")
    bounds = [0] + points + [n_layers]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"split points must increase strictly within (0, {n_layers}), got {points}")
    return points


def _virtual_stages(schedule: str, virtual_stages: Optional[int]) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    v = virtual_stages if virtual_stages is not None else (2 if schedule == "interleaved" else 1)
    if v < 1 or (v > 1 and schedule != "interleaved"):
        raise ValueError(f"virtual_stages={v}: only the interleaved schedule runs more than one stage per rank")
    return v


def _check_microbatches(schedule: str, m: int, pp: int) -> None:
    if m < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {m}")
    if schedule != "gpipe" and m < pp:
        name = "1F1B" if schedule == "1f1b" else "interleaved 1F1B"
        raise ValueError(f"{name} needs n_microbatches >= number of pipeline stages: {m} < {pp}")
    if schedule == "interleaved" and m % (m // pp):
        raise ValueError(f"interleaved 1F1B needs n_microbatches ({m}) to be a multiple of "
                         f"n_microbatches // pp = {m // pp} (e.g. a multiple of pp={pp})")


def _layers_and_splits(model, stages, split_points, pp: int, v: int) -> Tuple[Layers, Optional[List[int]]]:
    """The named layers to cut and the checked split points (None: to be balanced)."""
    n_stages = pp * v
    if (model is None) == (stages is None):
        raise ValueError("pass exactly one of model= (with optional split_points) or stages=")
    if stages is not None:
        if split_points is not None:
            raise ValueError("split_points apply to model=, not to stages= (already cut)")
        if len(stages) != n_stages:
            raise ValueError(f"stages= holds {len(stages)} modules; {pp} pipeline ranks x {v} virtual stages "
                             f"need {n_stages}")
        return [(str(j), s) for j, s in enumerate(stages)], list(range(1, n_stages))
    layers = _named_layers(model)
    if len(layers) < n_stages:
        raise ValueError(f"more stages than layers: {n_stages} stages ({pp} pipeline ranks x {v} virtual) "
                         f"but the model has {len(layers)} layers")
    if split_points is None:
        return layers, None
    return layers, _check_split_points(split_points, len(layers), n_stages)


class _GridGroups:
    """Pipeline and data-parallel process groups of a ``dp_size x pp`` grid (every rank creates all)."""

    def __init__(self, dp_size: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.pp, self.dp = world // dp_size, dp_size
        self.pp_rank, self.dp_rank = rank % self.pp, rank // self.pp
        self.pp_group = self.dp_group = None
        if dp_size == 1:
            return
        for d in range(self.dp):
            group = dist.new_group([d * self.pp + i for i in range(self.pp)])
            if d == self.dp_rank:
                self.pp_group = group
        for i in range(self.pp):
            group = dist.new_group([d * self.pp + i for d in range(self.dp)])
            if i == self.pp_rank:
                self.dp_group = group


class PipelineTrainer:
    """Trains a model cut into pipeline stages across the ranks of an initialised process group.

    Args:
        model: an ``nn.Sequential`` (or list of layers) whose layers, applied in order, form the model;
            every rank passes the same model (same initial weights) and keeps only its stages' layers.
        stages: instead of ``model``, the ``pp * virtual_stages`` stage modules in order (already cut).
        split_points: indices of the first layer of stages 1..S-1 (``model`` only).  When omitted, the
            layers are balanced by their measured forward + backward time on the first micro-batch
            (``example_input``, else the first batch's first micro-batch), measured on rank 0.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"``.
        n_microbatches: micro-batches per batch; the batch size must be a multiple of it
            (1F1B needs ``n_microbatches >= pp``).
        loss_fn: ``loss_fn(output, target) -> scalar``, averaged over the micro-batch.
        optimizer: factory ``optimizer(params) -> torch.optim.Optimizer`` applied to the local params.
        virtual_stages: stages per rank (interleaved only; default 2 for interleaved, else 1).
        dp_size: pipeline replicas (data parallel degree); the world size must be ``dp_size * pp``.
        device: where the local stages run (default: ``cuda:<current>`` on NCCL, else the CPU).
        example_input: one micro-batch of inputs, used to time the layers for balancing.
        log_file: a JSON-lines file of one record per step (global rank 0): ``step``, ``loss``, ``lr``
            (param group 0), ``step_s``, ``samples_per_s`` (over the pipeline replicas), ``peak_mem_bytes``.
        tensorboard: a directory for TensorBoard event files of the same records (global rank 0;
            ``pytrain.trainers.tracking``).  ``close()`` flushes and closes both.

    ``step(inputs, target)`` runs one batch (every rank of a pipeline passes the same batch; shape
    ``(batch, ...)``) and returns the mean loss on every rank.
    """

    def __init__(self, model=None, *, stages: Optional[Sequence[nn.Module]] = None,
                 split_points: Optional[Sequence[int]] = None, schedule: str = "gpipe", n_microbatches: int,
                 loss_fn: Callable[[Tensor, Tensor], Tensor],
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 virtual_stages: Optional[int] = None, dp_size: int = 1, device: Optional[torch.device] = None,
                 example_input: Optional[Tensor] = None, log_file: Optional[str] = None,
                 tensorboard: Optional[str] = None):
        if not dist.is_initialized():
            raise RuntimeError("PipelineTrainer needs an initialised process group: call "
                               "pytrain.trainers.launch.init_distributed() or torch.distributed.init_process_group()")
        world = dist.get_world_size()
        if dp_size < 1 or world % dp_size:
            raise ValueError(f"dp_size={dp_size} must divide the world size {world}")
        pp = world // dp_size
        self.schedule_name, self.virtual_stages = schedule, _virtual_stages(schedule, virtual_stages)
        self.n_microbatches, self.n_stages = int(n_microbatches), pp * self.virtual_stages
        _check_microbatches(schedule, self.n_microbatches, pp)
        self._layers, split_points = _layers_and_splits(model, stages, split_points, pp, self.virtual_stages)
        self.loss_fn, self._optimizer_factory = loss_fn, optimizer
        self.grid = _GridGroups(dp_size)
        self.device = torch.device(device) if device is not None else self._default_device()
        self.split_points: Optional[List[int]] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._busy = [0.0]
        self._busy_total = self._wall_total = 0.0
        self.steps, self._timed_steps = 0, -1  # optimizer steps; steps timed (this process's first is not)
        self._micro_shapes = None
        self.log = RunLog(JsonLogger(log_file), TensorBoardLog(tensorboard))
        if split_points is not None or example_input is not None:
            self._build(split_points, example_input)

    @staticmethod
    def _default_device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- building the local stages -------------------------------------------------------------

    def _balanced_split(self, example: Tensor) -> List[int]:
        """Split points from layer times measured on global rank 0, the same on every rank."""
        box: List[Optional[List[int]]] = [None]
        if dist.get_rank() == 0:
            modules = [m for _, m in self._layers]
            homes = [next(m.parameters(), example).device for m in modules]
            times = layer_times([m.to(self.device) for m in modules], example.to(self.device))
            for module, home in zip(modules, homes):  # only this rank's stages stay on its device
                module.to(home)
            box[0] = partition(times, self.n_stages)
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _build(self, split_points: Optional[List[int]], example: Optional[Tensor]) -> None:
        self.split_points = split_points if split_points is not None else self._balanced_split(example)
        bounds = [0] + self.split_points + [len(self._layers)]
        pp, rank = self.grid.pp, self.grid.pp_rank
        self.stage_indices = list(range(rank, self.n_stages, pp))
        self.stage_modules: List[nn.Sequential] = []
        pipeline_stages = []
        for j in self.stage_indices:
            module = nn.Sequential(OrderedDict(self._layers[bounds[j]:bounds[j + 1]])).to(self.device)
            self.stage_modules.append(module)
            stage = PipelineStage(module, j, self.n_stages, self.device, group=self.grid.pp_group)
            self._time_compute(stage)
            pipeline_stages.append(stage)
        del self._layers  # the other ranks' layers are no longer referenced here
        m = self.n_microbatches
        if self.schedule_name == "interleaved":
            self._schedule = ScheduleInterleaved1F1B(pipeline_stages, m, loss_fn=self.loss_fn)
        else:
            cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
            self._schedule = cls(pipeline_stages[0], m, loss_fn=self.loss_fn)
        self.optimizer = self._optimizer_factory(list(self.parameters()))

    def _time_compute(self, stage: PipelineStage) -> None:
        """Wrap the stage's compute calls so that their seconds add up in ``self._busy``."""
        busy, device = self._busy, self.device
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            inner = getattr(stage, name)

            def timed(*args, _inner=inner, **kwargs):
                start = time.perf_counter()
                out = _inner(*args, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                busy[0] += time.perf_counter() - start
                return out
            setattr(stage, name, timed)

    # ---- training ------------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """This rank's parameters, named as in the model passed in (``stages=``: ``"<stage>.<name>"``)."""
        for module in self.stage_modules:
            yield from module.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    @property
    def holds_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def holds_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_indices

    def _check_batch(self, inputs: Tensor, target: Tensor) -> None:
        m = self.n_microbatches
        for name, t in (("inputs", inputs), ("target", target)):
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise ValueError(f"{name} must be a tensor with a batch dimension, got {type(t).__name__}")
            if t.shape[0] % m:
                raise ValueError(f"{name} batch size {t.shape[0]} is not divisible by n_microbatches={m}")
        if inputs.shape[0] != target.shape[0]:
            raise ValueError(f"inputs and target batch sizes differ: {inputs.shape[0]} vs {target.shape[0]}")
        micro = tuple((t.shape[0] // m, *t.shape[1:], t.dtype) for t in (inputs, target))
        if self._micro_shapes is not None and micro != self._micro_shapes:
            raise ValueError(f"micro-batch shapes changed from {self._micro_shapes} to {micro}: the pipeline's "
                             "transfer buffers are sized at the first step (drop or pad an incomplete last batch)")
        self._micro_shapes = micro

    def step(self, inputs: Tensor, target: Tensor) -> float:
        """One optimizer step on a batch; returns the batch's mean loss (on every rank of the pipeline)."""
        self._check_batch(inputs, target)
        if self.optimizer is None:
            self._build(None, inputs[: inputs.shape[0] // self.n_microbatches])
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._run_schedule(inputs, target)
        self._average_over_replicas()
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step used
        self.optimizer.step()
        self.steps += 1
        seconds = time.perf_counter() - start
        self.log.log(step=self.steps, loss=loss, lr=lr, step_s=seconds,
                     samples_per_s=inputs.shape[0] * self.grid.dp / seconds,
                     peak_mem_bytes=peak_memory_bytes(self.device))
        return loss

    def close(self) -> None:
        """Flushes and closes the JSON-lines log and the TensorBoard event files."""
        self.log.close()

    def _run_schedule(self, inputs: Tensor, target: Tensor) -> float:
        args = (inputs.to(self.device),) if self.holds_first_stage else ()
        kwargs = {"target": target.to(self.device), "losses": []} if self.holds_last_stage else {}
        self._busy[0] = 0.0
        start = time.perf_counter()
        self._schedule.step(*args, return_outputs=False, **kwargs)
        wall = time.perf_counter() - start
        if self._timed_steps >= 0:  # the first step also infers shapes and allocates buffers
            self._busy_total += self._busy[0]
            self._wall_total += wall
        self._timed_steps += 1
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last_stage:
            loss = torch.stack([l.detach() for l in kwargs["losses"]]).double().mean()
        dist.broadcast(loss, group=self.grid.pp_group, group_src=(self.n_stages - 1) % self.grid.pp)
        return float(loss)

    def _average_over_replicas(self) -> None:
        if self.grid.dp == 1:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.grid.dp_group)
        flat /= self.grid.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- checkpoints --------------------------------------------------------------------------

    def _layout(self) -> Dict[str, object]:
        if self.optimizer is None:
            raise RuntimeError("the stages are built at the first step: pass split_points= or example_input= "
                               "to save or load before it")
        return {"n_stages": self.n_stages, "split_points": list(self.split_points), "stages": self.stage_indices}

    def state_dict(self) -> Dict[str, object]:
        """This rank's stages (module state dicts), optimizer, step count and stage layout."""
        return {"format": CHECKPOINT_FORMAT, "layout": self._layout(),
                "stages": [m.state_dict() for m in self.stage_modules], "optimizer": self.optimizer.state_dict(),
                "optimizer_class": st.optimizer_class(self.optimizer), "steps": self.steps}

    def load_state_dict(self, state: Dict[str, object], source: str = "checkpoint") -> None:
        """Restores ``state_dict()`` (or a file ``save`` wrote: also this replica's RNG streams); collective.
        Raises ``CheckpointError`` on every rank and loads nothing anywhere if, on any rank, the layout differs,
        a counter or value is out of range (negative steps, NaN/Inf weights or states), the optimizer's class or
        state shapes differ, or any part does not fit."""
        error = None
        try:
            self._check(state, source)
        except CheckpointError as exc:
            error = exc
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            error = CheckpointError(f"{source}: malformed checkpoint ({type(exc).__name__}: {exc})")
        st.agree(error, f"checking {source}")
        st.restore_all_or_nothing(self._snapshot, self._apply, state, source)
        self.steps = int(state["steps"])

    def _check(self, state: Dict[str, object], source: str) -> None:
        st.check_format(state, CHECKPOINT_FORMAT, source, "PipelineTrainer", untagged_ok=True)
        if state.get("layout") != self._layout():
            raise CheckpointError(f"checkpoint stage layout {state.get('layout')} does not match this "
                                  f"trainer's {self._layout()}")
        st.check_counters(state, source, {"steps": (0, float("inf"))})
        st.check_finite(state["stages"], source, "stage")
        st.check_optimizer(state["optimizer"], state["optimizer_class"], self.optimizer, source)

    def _snapshot(self) -> Dict[str, object]:
        """What ``_apply`` restores, shaped like a saved file with only this replica's part."""
        return {"stages": [m.state_dict() for m in self.stage_modules], "optimizer": self.optimizer.state_dict(),
                "ranks": {self.grid.dp_rank: st.local_state()}}

    def _apply(self, state: Dict[str, object]) -> None:
        if len(state["stages"]) != len(self.stage_modules):
            raise ValueError(f"{len(state['stages'])} stage states for {len(self.stage_modules)} stages")
        local = state["ranks"][self.grid.dp_rank] if "ranks" in state else None  # state_dict(): no RNG streams
        for module, stage_state in zip(self.stage_modules, state["stages"]):
            module.load_state_dict(stage_state)
        self.optimizer.load_state_dict(state["optimizer"])
        if local is not None:
            st.set_rng_state(local["rng"])

    def _checkpoint_path(self, directory) -> Path:
        return Path(directory) / f"pipeline-stage{self.grid.pp_rank}-of{self.grid.pp}.pt"

    def save(self, directory) -> None:
        """Writes one file per pipeline rank (replica 0 writes, atomically); collective."""
        local = st.local_state()
        ranks = [local] if self.grid.dp == 1 else st.gather_ranks(local, self.grid.dp_group)
        state = {**self.state_dict(), "ranks": ranks} if self.grid.dp_rank == 0 else None
        st.save_collective(state, self._checkpoint_path(directory), writer=self.grid.dp_rank == 0)

    def load(self, directory) -> None:
        """Loads what ``save(directory)`` wrote into this rank's stages and optimizer, and this replica's RNG
        (collective: if any rank cannot read its file, every rank raises ``CheckpointError``)."""
        path = self._checkpoint_path(directory)
        state, error = None, None
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            error = exc
        st.agree(error, f"reading {path}")
        self.load_state_dict(state, source=str(path))

    # ---- bubble --------------------------------------------------------------------------------

    def bubble_report(self) -> BubbleReport:
        """Measured idle fraction and step time of the pipeline next to the cost model's (collective); a
        ``pytrain.cost.report.BubbleReport`` (a readable record that still reads like a dict: ``report["measured"]``).

        measured: mean over the pipeline's ranks of ``1 - compute / wall`` of the schedule, summed over
        every step after the first; predicted: ``pytrain.cost.bubble_fraction``.  step_s: mean wall
        seconds of a schedule step; predicted_step_s: ``pytrain.cost.pipeline_step`` fed each rank's
        measured compute per micro-batch; imbalance: ``max / mean`` of the ranks' compute.
        """
        per_rank: List[Optional[Tuple[float, float]]] = [None] * self.grid.pp
        dist.all_gather_object(per_rank, (self._busy_total, self._wall_total), group=self.grid.pp_group)
        timed = self._timed_steps
        if timed < 1:
            raise RuntimeError("bubble_report needs at least 2 steps (the first one is not timed)")
        busy, idle = [b for b, _ in per_rank], [1.0 - b / w for b, w in per_rank]
        pp, m, v = self.grid.pp, self.n_microbatches, self.virtual_stages
        return BubbleReport(
            schedule=self.schedule_name, stages=pp, virtual_stages=v, microbatches=m,
            measured=sum(idle) / pp, predicted=bubble_fraction(pp, m, self.schedule_name, v),
            per_rank=idle, imbalance=load_balance(busy),
            step_s=sum(w for _, w in per_rank) / pp / timed,
            predicted_step_s=pipeline_step([b / timed / m for b in busy], m, self.schedule_name, v))
