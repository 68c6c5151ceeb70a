"""Data-parallel training on ``torch.nn.parallel.DistributedDataParallel``.

One optimizer step of ``DDPTrainer`` with global batch B on W ranks and A accumulation
steps: every rank draws B / W samples (its ``DistributedSampler`` share) in A micro-batches
of B / (W A); the first A - 1 backward passes run under ``no_sync`` (gradients accumulate
locally), the last one all-reduces them, through the communication hook when one is
registered.  Each micro-batch loss is divided by A, so the averaged gradient equals the
gradient of the mean loss over the B samples (one big batch), up to fp32 rounding.

Mixed precision: ``torch.autocast`` in bf16 or fp16; fp16 adds a ``GradScaler`` (its
``step`` unscales before the optimizer, so in-step clipping sees true gradients).
Clipping: optimizers with ``max_grad_norm`` built in (``pytrain.optim.FusedAdamW``,
``FusedLAMB``) clip inside their fused step; others get ``clip_grad_norm_``.

Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end, the last
``keep_last`` kept) hold the model, optimizer (and its class), scheduler, scaler, the sampler position
(epoch and batch within it, so a run resumes mid-epoch), early-stopping state, and per
rank the RNG states (torch, CUDA, Python, NumPy) and the hook state (``pytrain.trainers.state``).  On CPU
a run interrupted after a checkpoint and resumed with ``resume=True`` ends with parameters bit-identical
to the uninterrupted run.  Rank 0 owns ``checkpoint_dir`` (``checkpoint.DirectoryLock``) from construction
until ``fit`` returns: a second job on the same directory fails at once, naming the holder.  On resume, rank 0
picks the checkpoint, every rank reads and checks it (checksum, counters, finite values, model and optimizer
shapes and class) and all ranks raise ``CheckpointError`` together if any cannot; nothing is replaced unless
every check and load succeeds on every rank.

Faults: with two or more ranks ``fit`` runs a ``watchdog.Watchdog`` (``watchdog_timeout`` seconds): a rank that
stalls, vanishes or raises ends every rank with an error naming it (``watchdog.RankFailure``).
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..comm.hooks import make_hook
from . import checkpoint as ckpt
from . import state as st
from .launch import init_distributed
from .metrics import JsonLogger, ProgressBar, TrainSummary, is_main_rank
from .tracking import RunLog, TensorBoardLog, peak_memory_bytes
from .schedules import build_scheduler, steps_on_validation
from .watchdog import Watchdog

CHECKPOINT_FORMAT = "pytrain.ddp/2"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HookPair = Tuple[Any, Callable]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way: ``set_epoch(epoch, skip=n)`` drops its first n indices."""

    skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class DDPTrainer:
    """Data-parallel trainer; call ``fit()``.  Every rank constructs it with the same arguments.

    Args:
        model: the module (moved to this rank's device; wrapped in DDP).
        optimizer: built on ``model.parameters()``.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` (mean over the batch).
        train_data: map-style dataset of ``(inputs, targets)`` pairs.
        batch_size: global batch per optimizer step, over all ranks and accumulation steps;
            must be divisible by ``world_size * grad_accum``.
        val_data: dataset for the validation loss (every ``eval_every`` steps, default once per epoch).
        comm_hook: None (DDP's all-reduce), a name ("allreduce", "powersgd", "topk", "int8";
            ``pytrain.comm``), or a ``(state, hook)`` pair for ``register_comm_hook``.
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler).
        grad_accum: micro-batches per step (all but the last under ``no_sync``).
        max_grad_norm: global gradient-norm clip (None: no clipping).
        lr_schedule: None or a name of ``schedules.SCHEDULES`` ("constant", "cosine" (linear warmup + cosine),
            "onecycle", "cyclic", "step", "plateau"), or ``fn(optimizer, total_steps) -> LRScheduler``;
            ``warmup_steps`` for those that warm up (see ``pytrain.trainers.schedules``).
        max_steps / epochs: training length (``max_steps`` wins when both are given).
        checkpoint_dir, checkpoint_every, keep_last: checkpoints (see module docstring); ``checkpoint_every``
            None or 0: only at the end of ``fit``.
        resume: False, True (the latest checkpoint in ``checkpoint_dir``, as rank 0 sees it; none: start from
            step 0; ``CheckpointError`` if the directory does not exist) or a checkpoint path.
        patience, min_delta: early stopping after ``patience`` evaluations without a val-loss
            improvement of more than ``min_delta``.
        log_file: JSON lines, one record per step and per evaluation (rank 0).
        tensorboard: a directory for TensorBoard event files of the same records (rank 0;
            ``pytrain.trainers.tracking``).
        progress: draw a progress bar (tqdm: elapsed, ETA, rate) on rank 0's stderr when it is a terminal.
        seed: the samplers' shuffling seed (same on every rank).
        watchdog_timeout: seconds a rank may go without progress (or a heartbeat) during ``fit`` before every
            rank ends with a ``RankFailure`` naming it; must exceed the longest step, evaluation or checkpoint
            write.  None: no watchdog.
    """

    checkpoint_suffix = ".pt"  # checkpoint files: step-<step>.pt

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, train_data: Dataset, *,
                 batch_size: int, val_data: Optional[Dataset] = None,
                 comm_hook: Union[None, str, HookPair] = None, precision: str = "fp32", grad_accum: int = 1,
                 max_grad_norm: Optional[float] = None, lr_schedule: Union[None, str, Callable] = None,
                 warmup_steps: int = 0, max_steps: Optional[int] = None, epochs: int = 1,
                 checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None, keep_last: int = 3,
                 resume: Union[bool, str] = False, eval_every: Optional[int] = None, patience: Optional[int] = None,
                 min_delta: float = 0.0, log_file: Optional[str] = None,
                 tensorboard: Optional[str] = None, progress: bool = False, seed: int = 0,
                 bucket_cap_mb: float = 25.0, watchdog_timeout: Optional[float] = 120.0):
        self.info = init_distributed()
        self.world_size = self.info.world_size
        self.data_ranks, self.data_rank = self._data_parallel()  # who splits the batch (all ranks, for DDP)
        self._check_args(batch_size, grad_accum, precision, keep_last, max_grad_norm, train_data, resume,
                         checkpoint_dir, checkpoint_every, watchdog_timeout)
        self.watchdog_timeout = watchdog_timeout
        self._watchdog: Union[Watchdog, _NoWatchdog] = _NoWatchdog()
        self.batch_size, self.grad_accum, self.precision = batch_size, grad_accum, precision
        self.micro_batch = batch_size // (self.data_ranks * grad_accum)
        self.device = self.info.device
        self.model = model.to(self.device)
        self.ddp = self._wrap(bucket_cap_mb)
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.hook_name = comm_hook if isinstance(comm_hook, str) else (None if comm_hook is None else "custom")
        self.hook_state = self._register_hook(comm_hook)
        self.max_grad_norm = max_grad_norm
        self._clip_in_step = hasattr(optimizer, "max_grad_norm")
        if self._clip_in_step and max_grad_norm is not None:
            optimizer.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.sampler = ResumableSampler(train_data, num_replicas=self.data_ranks, rank=self.data_rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.loader = self._loader(train_data, self.sampler)
        self.steps_per_epoch = (self.sampler.num_samples // self.micro_batch) // grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"DDPTrainer: the training set ({len(train_data)} samples, {self.sampler.num_samples} "
                             f"per rank) is smaller than one step's share per rank ({batch_size // self.data_ranks})")
        self.total_steps = max_steps if max_steps is not None else epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(lr_schedule, optimizer, self.total_steps, warmup_steps)
        self.val_loader = None
        if val_data is not None:
            val_sampler = DistributedSampler(val_data, num_replicas=self.data_ranks, rank=self.data_rank,
                                             shuffle=False)
            self.val_loader = self._loader(val_data, val_sampler)
        self.eval_every = eval_every or self.steps_per_epoch
        self.patience, self.min_delta = patience, min_delta
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.keep_last = checkpoint_every, keep_last
        self.log = RunLog(JsonLogger(log_file, append=bool(resume)), TensorBoardLog(tensorboard))
        self.progress = progress
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_val, self.bad_evals, self.stopped_early = math.inf, 0, False
        self.history: List[dict] = []  # one record per step this trainer trained
        self._saved_step: Optional[int] = None  # decided alike on every rank (no file-system check)
        self._lock: Optional[ckpt.DirectoryLock] = None
        self._mark_start()
        resume_from = st.resume_path(resume, self.checkpoint_dir, self.checkpoint_suffix) if resume else None  # before the lock creates it
        if self.checkpoint_dir is not None:
            st.agree(self._hold_directory() if is_main_rank() else None, f"locking {self.checkpoint_dir}")
        if resume_from is not None:
            try:
                self._resume(resume_from)
            except BaseException:
                self.close()  # a trainer that failed to construct holds nothing
                raise
        elif resume:
            self.log.log(note=f"resume: no checkpoint in {self.checkpoint_dir}, starting from scratch")

    # ------------------------------------------------------------------------------------ setup
    def _check_args(self, batch_size, grad_accum, precision, keep_last, max_grad_norm, train_data, resume,
                    checkpoint_dir, checkpoint_every, watchdog_timeout) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"DDPTrainer: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"DDPTrainer: grad_accum must be an int >= 1, got {grad_accum!r}")
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % (self.data_ranks * grad_accum):
            raise ValueError(f"DDPTrainer: batch_size {batch_size} is not divisible by {self.data_ranks} data-parallel "
                             f"ranks x grad_accum {grad_accum} = {self.data_ranks * grad_accum}; each rank needs whole "
                             "micro-batches of the same size")
        if keep_last < 1:
            raise ValueError(f"DDPTrainer: keep_last must be >= 1, got {keep_last}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"DDPTrainer: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if len(train_data) == 0:
            raise ValueError("DDPTrainer: the training set is empty")
        if resume is True and checkpoint_dir is None:
            raise ValueError("DDPTrainer: resume=True needs checkpoint_dir (or pass resume=<checkpoint path>)")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 0):
            raise ValueError(f"DDPTrainer: checkpoint_every must be None or an int >= 0 (0: only at the end), "
                             f"got {checkpoint_every!r}")
        if watchdog_timeout is not None and not watchdog_timeout > 0:
            raise ValueError(f"DDPTrainer: watchdog_timeout must be > 0 seconds or None (off), got {watchdog_timeout}")

    def _hold_directory(self) -> Optional[Exception]:
        """Takes ``checkpoint_dir``'s lock unless this trainer holds it; returns the error instead of raising."""
        if self._lock is None or not self._lock.held:
            try:
                self._lock = ckpt.DirectoryLock(self.checkpoint_dir)
            except ckpt.CheckpointError as exc:
                return exc
        return None

    def close(self) -> None:
        """Releases ``checkpoint_dir`` for other jobs (``fit`` does when it returns); idempotent."""
        if self._lock is not None:
            self._lock.release()

    def _loader(self, data: Dataset, sampler: DistributedSampler) -> DataLoader:
        # a private generator: creating an iterator must not draw from the global RNG (resumes would drift)
        return DataLoader(data, batch_size=self.micro_batch, sampler=sampler, drop_last=False,
                          generator=torch.Generator().manual_seed(0))

    def _data_parallel(self) -> Tuple[int, int]:
        """(ranks the global batch is split over, this rank's index among them): every rank for DDP.  The loss and
        validation averages over all ranks stay right when groups of ranks share a share (tensor parallelism)."""
        return self.world_size, self.info.rank

    def _wrap(self, bucket_cap_mb: float) -> nn.Module:
        """The module the training steps call: ``self.model`` wrapped in DDP (the FSDP trainer: the model itself)."""
        return DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       bucket_cap_mb=bucket_cap_mb)

    def _no_sync(self):
        """Context in which backward passes accumulate gradients locally, without communication."""
        return self.ddp.no_sync()

    def _register_hook(self, comm_hook):
        if comm_hook is None:
            return None
        state, hook = make_hook(comm_hook) if isinstance(comm_hook, str) else comm_hook
        self.ddp.register_comm_hook(state, hook)
        return state

    # ------------------------------------------------------------------------------------ training
    def _batches(self) -> Iterator[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's micro-batches of one step at a time, from the current position to the epoch's end."""
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.micro_batch * self.grad_accum)
        micro: List = []
        for inputs, targets in self.loader:
            if len(inputs) < self.micro_batch:
                break
            micro.append((inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)))
            if len(micro) == self.grad_accum:
                yield micro
                micro = []

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _forward_backward(self, micro: List[Tuple[torch.Tensor, torch.Tensor]], sync: bool = True) -> torch.Tensor:
        """Accumulates the gradient of the mean loss over ``micro``; returns that loss (detached, fp32)."""
        total = torch.zeros((), device=self.device)
        for i, (inputs, targets) in enumerate(micro):
            last = sync and i == len(micro) - 1
            with nullcontext() if last else self._no_sync():
                self._watchdog.mark(f"step {self.step + 1} forward (micro-batch {i})")
                with self._autocast():
                    loss = self.loss_fn(self.ddp(inputs), targets)
                self._watchdog.mark(f"step {self.step + 1} backward (micro-batch {i})")
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach().float()
        return total / len(micro)

    def _optimizer_step(self) -> Tuple[Optional[float], bool]:
        """Clip and step (through the scaler); returns (gradient norm before clipping, step skipped)."""
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self._clip_in_step:
            self.scaler.step(self.optimizer)
            norm = self.optimizer.last_grad_norm if self.optimizer.max_grad_norm is not None else None
        else:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor grads: a DTensor
            self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = bool(getattr(self.optimizer, "last_step_skipped", False))
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            skipped = True  # the scaler found Inf/NaN gradients and did not call the optimizer
        if norm is None and not skipped:
            norm = self._grad_norm()
        return norm, skipped

    def _grad_norm(self) -> float:
        if hasattr(self.optimizer, "grad_norm"):
            return self.optimizer.grad_norm()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _train_step(self, micro) -> dict:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(micro)
        self._watchdog.mark(f"step {self.step + 1} optimizer")
        opt_start = time.perf_counter()
        norm, skipped = self._optimizer_step()
        opt_s = time.perf_counter() - opt_start
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None and not steps_on_validation(self.scheduler):
            self.scheduler.step()
        self._watchdog.mark(f"step {self.step + 1} loss all-reduce")
        dist.all_reduce(loss)
        step_s = time.perf_counter() - start
        self._tokens_per_step = self.batch_size * micro[0][1][0].numel()
        record = {"step": self.step + 1, "epoch": self.epoch, "loss": float(loss) / self.world_size, "lr": lr,
                  "grad_norm": norm, "step_s": step_s, "opt_s": opt_s, "samples_per_s": self.batch_size / step_s,
                  "tokens_per_s": self._tokens_per_step / step_s, "peak_mem_bytes": peak_memory_bytes(self.device)}
        if skipped:
            record["skipped"] = True
        record.update(self.comm_stats())
        return record

    def comm_stats(self) -> dict:
        """This rank's cumulative bytes from the hook state's ``stats`` (empty without a counting hook)."""
        stats = getattr(self.hook_state, "stats", None)
        if stats is None:
            return {}
        return {"bytes_sent": int(stats.bytes_sent), "bytes_uncompressed": int(stats.bytes_uncompressed)}

    def fit(self, stop_after: Optional[int] = None) -> TrainSummary:
        """Trains to ``total_steps`` (or early stop); returns the summary (``summary()``).

        ``stop_after``: return after this global step without a final checkpoint, as a
        crash or preemption would (for tests and time-boxed jobs).

        Raises ``watchdog.RankFailure`` naming the rank that failed first when a collective fails because another
        rank stalled, vanished or raised (after ``watchdog_timeout`` seconds at most); this rank's own errors
        propagate as they are.  Releases ``checkpoint_dir`` when it returns or raises.
        """
        use_watchdog = self.watchdog_timeout is not None and self.world_size > 1
        self._watchdog = Watchdog(self.watchdog_timeout) if use_watchdog else _NoWatchdog()
        try:
            with self._watchdog:
                try:
                    return self._fit(stop_after)
                except Exception as exc:
                    raise self._watchdog.failure(exc)
        finally:
            self._watchdog = _NoWatchdog()
            self.close()

    def _fit(self, stop_after: Optional[int]) -> TrainSummary:
        bar = ProgressBar(self.total_steps, enabled=self.progress, initial=self.step)
        self.ddp.train()
        while self.step < self.total_steps and not self.stopped_early:
            for micro in self._batches():
                record = self._train_step(micro)
                self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                self.history.append(record)
                self.log.log(**record)
                bar.update(self.step, f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s")
                self._after_step()
                if self.step >= self.total_steps or self.stopped_early:
                    break
                if stop_after is not None and self.step >= stop_after:
                    bar.close()
                    return self.summary()
            else:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        bar.close()
        if self.checkpoint_dir is not None and self._saved_step != self.step:
            self._watchdog.mark(f"step {self.step} final checkpoint")
            self.save_checkpoint()
        self._watchdog.mark("summary")
        return self.summary()

    def _after_step(self) -> None:
        if self.val_loader is not None and self.step % self.eval_every == 0:
            self._watchdog.mark(f"step {self.step} evaluation")
            val = self.evaluate()
            self.log.log(step=self.step, val_loss=val)
            self.history[-1]["val_loss"] = val
            if steps_on_validation(self.scheduler):
                self.scheduler.step(val)
            if val < self.best_val - self.min_delta:
                self.best_val, self.bad_evals = val, 0
            else:
                self.bad_evals += 1
                self.stopped_early = self.patience is not None and self.bad_evals >= self.patience
        if self.checkpoint_every and self.checkpoint_dir is not None and self.step % self.checkpoint_every == 0:
            self._watchdog.mark(f"step {self.step} checkpoint")
            self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over all ranks' shares of ``val_data``."""
        self.ddp.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for inputs, targets in self.val_loader:
            with self._autocast():
                loss = self.loss_fn(self.model(inputs.to(self.device)), targets.to(self.device))
            totals += torch.tensor([float(loss) * len(inputs), len(inputs)], dtype=torch.float64, device=self.device)
        self.ddp.train()
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    def _first_micro_batches(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's first ``grad_accum`` micro-batches of the unshuffled data (leaves the sampler alone)."""
        sampler = DistributedSampler(self.sampler.dataset, num_replicas=self.data_ranks, rank=self.data_rank,
                                     shuffle=False)
        batches = iter(self._loader(self.sampler.dataset, sampler))
        return [tuple(t.to(self.device) for t in next(batches)) for _ in range(self.grad_accum)]

    def measure_compute(self, repeats: int = 3) -> float:
        """Median seconds of one step's forward + backward with no gradient communication (for cost models).

        Leaves the gradients zeroed; draws from the global RNG if the model does (dropout),
        so call it after training.
        """
        micro = self._first_micro_batches()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._forward_backward(micro, sync=False)
            times.append(time.perf_counter() - start)
            self.optimizer.zero_grad(set_to_none=True)
        return statistics.median(times)

    def _mark_start(self) -> None:
        """Where this trainer's run starts (construction or a load): what ``summary`` counts from."""
        self.start_step, self._start_bytes = self.step, self.comm_stats()

    def summary(self) -> TrainSummary:
        """What this trainer did since it was constructed or resumed: steps run and their measurements, the bytes
        summed over ranks (collective: call on every rank)."""
        records = self.history
        out: Dict[str, Any] = {"steps": self.step, "start_step": self.start_step, "steps_run": len(records),
                               "epochs": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                               "world_size": self.world_size, "stopped_early": self.stopped_early}
        if records:
            times = [r["step_s"] for r in records[1:]] or [records[0]["step_s"]]
            out.update(first_loss=records[0]["loss"], final_loss=records[-1]["loss"],
                       median_step_s=statistics.median(times),
                       median_opt_s=statistics.median(r["opt_s"] for r in records),
                       tokens_per_s=self._tokens_per_step / statistics.mean(times))
        if math.isfinite(self.best_val):
            out["best_val_loss"] = self.best_val
        stats = self.comm_stats()
        if stats:
            totals = torch.tensor([stats[k] - self._start_bytes[k] for k in ("bytes_sent", "bytes_uncompressed")],
                                  dtype=torch.float64)
            dist.all_reduce(totals)
            out.update(bytes_sent=int(totals[0]), bytes_uncompressed=int(totals[1]))
        return TrainSummary(**out)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resume needs, with the per-rank parts of every rank (collective: call on every rank)."""
        ranks = st.gather_ranks(st.local_state(self.hook_state))
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum, "precision": self.precision, "hook": self.hook_name,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_class": st.optimizer_class(self.optimizer),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "early_stopping": {"best_val": self.best_val, "bad_evals": self.bad_evals},
                "ranks": ranks}

    def save_checkpoint(self) -> Optional[Path]:
        """Writes ``step-<step>.pt`` atomically from rank 0 and prunes to ``keep_last`` (collective); takes the
        directory's lock again if ``fit`` released it."""
        path = self.checkpoint_dir / ckpt.checkpoint_name(self.step)

        def hold() -> None:
            error = self._hold_directory()
            if error is not None:
                raise error

        st.save_collective(self.state_dict(), path, writer=is_main_rank(), keep_last=self.keep_last, prepare=hold)
        self._saved_step = self.step
        return path

    def _resume(self, path: Path) -> None:
        """Loads ``path`` on every rank; if any rank cannot read it, every rank raises (collective)."""
        state, error = None, None
        try:
            state = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            error = exc
        st.agree(error, f"reading {path}")
        self.load_state_dict(state, source=str(path))

    def _check_compatible(self, state: dict, source: str) -> None:
        st.check_format(state, CHECKPOINT_FORMAT, source, "DDPTrainer")
        st.check_counters(state, source, {"step": (0, math.inf), "epoch": (0, math.inf),
                                          "batch_in_epoch": (0, self.steps_per_epoch + 1)})
        for key, mine in (("world_size", self.world_size), ("batch_size", self.batch_size),
                          ("grad_accum", self.grad_accum), ("precision", self.precision), ("hook", self.hook_name)):
            if state.get(key) != mine:
                raise ckpt.CheckpointError(f"{source}: written with {key}={state.get(key)!r}, this run has "
                                           f"{key}={mine!r}; resume with the same setting")
        theirs, mine = state["model"], self.model.state_dict()
        problems = [f"missing {k}" for k in mine if k not in theirs] + \
                   [f"unexpected {k}" for k in theirs if k not in mine] + \
                   [f"{k}: shape {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in mine.items() if k in theirs and theirs[k].shape != v.shape]
        if problems:
            raise ckpt.CheckpointError(f"{source}: model does not match the checkpoint ({len(problems)} problems: "
                                       f"{'; '.join(problems[:5])})")
        st.check_finite(theirs, source, "model")
        st.check_optimizer(state["optimizer"], state["optimizer_class"], self.optimizer, source)
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ckpt.CheckpointError(f"{source}: checkpoint {'has no' if state['scheduler'] is None else 'has a'} "
                                       "LR scheduler state, this run does the opposite")

    def _snapshot(self) -> dict:
        """What ``_apply`` restores, shaped like a checkpoint with only this rank's part."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "ranks": {self.info.rank: st.local_state(self.hook_state)}}

    def _apply(self, state: dict) -> None:
        local = state["ranks"][self.info.rank]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if local["hook"] is not None:  # pytrain's states regroup their memories at the next backward themselves
            self.hook_state.load_state_dict(local["hook"])
        st.set_rng_state(local["rng"])

    def load_state_dict(self, state: Optional[dict], source: str = "checkpoint") -> None:
        """Restores a ``state_dict()`` (collective); all or nothing: if any check or load fails on any rank, every
        rank raises ``CheckpointError`` and keeps its state."""
        error = None
        try:
            self._check_compatible(state, source)
        except ckpt.CheckpointError as exc:
            error = exc
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            error = ckpt.CheckpointError(f"{source}: malformed checkpoint ({type(exc).__name__}: {exc})")
        st.agree(error, f"checking {source}")
        st.restore_all_or_nothing(self._snapshot, self._apply, state, source)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self._saved_step = self.step
        self.best_val = state["early_stopping"]["best_val"]
        self.bad_evals = state["early_stopping"]["bad_evals"]
        self._mark_start()


class _NoWatchdog:
    """What ``DDPTrainer`` uses outside ``fit`` or on one rank: marks cost nothing, errors pass through."""

    def mark(self, where: str) -> None:
        pass

    def failure(self, exc: BaseException) -> BaseException:
        return exc

    def __enter__(self) -> "_NoWatchdog":
        return self

    def __exit__(self, *exc_info) -> None:
        pass
