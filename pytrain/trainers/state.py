"""What the trainers' checkpoints hold besides the model, and how both trainers write, check and restore them.

``DDPTrainer`` and ``PipelineTrainer`` build their own payloads (a dict of tensors, numbers, strings and
containers, tagged with a ``format`` string) and share the rest from here:

* RNG streams: ``rng_state()`` / ``set_rng_state()`` capture and restore torch's CPU generator, every CUDA
  device's (when CUDA is available), Python's ``random`` and NumPy's global generator, in types that
  ``torch.load(weights_only=True)`` reads back.
* Per-rank parts: ``local_state()`` is one rank's RNG streams and hook state; ``gather_ranks`` collects
  every rank's on one rank, which writes them in its file (``"ranks"``, indexed by rank).
* Writing: ``save_collective`` writes atomically (``checkpoint.atomic_save``) on the writing ranks and lets
  every rank know whether all writes succeeded, so that no rank waits forever for a failed writer.
* Reading: ``resume_path`` (which file ``resume=`` means: rank 0 decides and tells the others, whose node-local
  disks may hold other files), ``check_format`` (is it this trainer's payload?), the sanity checks
  (``check_counters``, ``check_finite``, ``check_optimizer``: all before anything is replaced), ``agree`` (every
  rank learns whether every rank could read and check its part, so all raise together instead of hanging) and
  ``restore_all_or_nothing`` (apply a payload; on any error, on any rank, put the previous state back).
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, PathLike, atomic_save, latest_checkpoint, prune


# ------------------------------------------------------------------------------------------ RNG streams
def rng_state() -> dict:
    """This process's RNG streams: torch (CPU), CUDA (every device, when available), Python, NumPy."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores ``rng_state()``'s streams (the CUDA ones only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """Python's RNG state is nested tuples; serialisers may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------ per-rank parts
def local_state(hook_state: Any = None) -> dict:
    """One rank's part of a checkpoint: its RNG streams and its comm-hook state (None without one)."""
    hook = hook_state.state_dict() if hasattr(hook_state, "state_dict") else None
    return {"rng": rng_state(), "hook": hook}


def gather_ranks(local: Any, group=None) -> Optional[List[Any]]:
    """Every rank's ``local``, in group-rank order, on the group's first rank (None on the others).

    Collective over ``group`` (None: the default group)."""
    out = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(local, out, group=group, group_dst=0)
    return out


# ------------------------------------------------------------------------------------------ writing
def save_collective(state: Optional[dict], path: PathLike, *, writer: bool, keep_last: Optional[int] = None,
                    prepare: Optional[Callable[[], None]] = None) -> None:
    """Writes ``state`` to ``path`` atomically on the ranks where ``writer`` is true (after ``prepare()`` when
    given, creating the directory and pruning it to ``keep_last`` checkpoints when given), then tells every rank of
    the default group whether all writes succeeded (collective).  A failed write raises its own error on its rank
    and a ``CheckpointError`` naming that rank on the others, so none waits forever."""
    path, error = Path(path), None
    if writer:
        try:
            if prepare is not None:
                prepare()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(state, path)
            if keep_last is not None:
                prune(path.parent, keep_last)
        except Exception as exc:  # tell the other ranks before raising, so none waits forever
            error = exc
    flags: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, None if error is None else (str(path), f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    for rank, flag in enumerate(flags):
        if flag is not None:
            raise CheckpointError(f"rank {rank} failed to write checkpoint {flag[0]}: {flag[1]}")


# ------------------------------------------------------------------------------------------ reading
def resume_path(resume: Union[bool, PathLike], directory: Optional[PathLike], suffix: str = ".pt") -> Optional[Path]:
    """The checkpoint ``resume`` names: True, the latest ``*<suffix>`` in ``directory`` (None if there is none; a
    ``CheckpointError`` if ``directory`` does not exist); a path, itself.

    Collective when a process group is initialised: rank 0 decides and every rank gets the same file name, in its
    own ``directory`` (on node-local disks the ranks' directories may differ: a rank that lacks the file then fails
    to read it, clearly, instead of resuming from another step)."""
    if resume is not True:
        return Path(resume)
    decision: List[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not Path(directory).is_dir():
            decision[0] = ("error", f"resume: checkpoint directory {directory} does not exist (rank 0)")
        else:
            latest = latest_checkpoint(directory, suffix)
            decision[0] = ("name", latest.name if latest is not None else None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    kind, value = decision[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(directory) / value if value is not None else None


def agree(error: Optional[BaseException], what: str, group=None) -> None:
    """Collective over ``group``: raises ``CheckpointError`` on every rank if ``error`` is not None on any, naming
    each failed (global) rank and its error, so that no rank goes on alone into a collective and hangs."""
    mine = None if error is None else f"{type(error).__name__}: {error}" \
        if not isinstance(error, CheckpointError) else str(error)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        reports: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(reports, (dist.get_rank(), mine), group=group)
    else:
        reports = [(0, mine)]
    failed = [(rank, msg) for rank, msg in reports if msg is not None]
    if failed:
        raise CheckpointError(f"{what} failed on {len(failed)} of {len(reports)} ranks: "
                              + "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)) from error


# ------------------------------------------------------------------------------------------ sanity checks
def check_counters(state: dict, source: str, limits: Dict[str, Tuple[int, float]]) -> None:
    """Each ``state[key]`` must be an int in ``[low, high)`` (``limits``: key -> (low, high))."""
    for key, (low, high) in limits.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            raise CheckpointError(f"{source}: {key}={value!r} is not an int in [{low}, {high})")


def _tensors(tree: Any, path: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if torch.is_tensor(tree):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}[{i}]")


def check_finite(tree: Any, source: str, what: str) -> None:
    """Every floating tensor in ``tree`` (nested dicts, lists) must be finite: a NaN or Inf weight or optimizer
    moment means a diverged or corrupted run, which a resume would only carry on."""
    for path, t in _tensors(tree):
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{source}: {what} {path} has {bad} non-finite (NaN/Inf) of {t.numel()} "
                                      "values; refusing to resume from a diverged or corrupted state")


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_optimizer(saved: Any, saved_class: Any, optimizer: torch.optim.Optimizer, source: str) -> None:
    """``saved`` (an optimizer state dict written by an optimizer of class ``saved_class``) fits ``optimizer``:
    same class, same param groups, finite states, and every state tensor shaped as its parameter, a scalar, or
    (``*_scale``: per-block quantisation scales) a vector of 1 .. numel entries.  Checked before loading, since
    ``Optimizer.load_state_dict`` accepts misshapen states that then fail (or broadcast silently) at a step."""
    mine = optimizer_class(optimizer)
    if saved_class != mine:
        raise CheckpointError(f"{source}: the checkpoint holds the state of a {saved_class} optimizer, this run uses "
                              f"{mine}; resume with the same optimizer")
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"{source}: optimizer param groups do not match the checkpoint's "
                              f"({[len(g['params']) for g in groups]} vs "
                              f"{[len(g['params']) for g in optimizer.param_groups]} parameters)")
    params = dict(zip((i for g in groups for i in g["params"]), (p for g in optimizer.param_groups
                                                                  for p in g["params"])))
    check_finite(saved["state"], source, "optimizer state")
    for pid, entry in saved["state"].items():
        if pid not in params:
            raise CheckpointError(f"{source}: optimizer state for parameter {pid!r}, which no param group lists")
        p = params[pid]
        for key, value in entry.items():
            if not torch.is_tensor(value) or value.shape == p.shape or value.numel() == 1 and value.dim() <= 1:
                continue
            if key.endswith("_scale") and value.dim() == 1 and 1 <= value.numel() <= max(1, p.numel()):
                continue
            raise CheckpointError(f"{source}: optimizer state {key!r} of parameter {pid} has shape "
                                  f"{tuple(value.shape)}, the parameter has {tuple(p.shape)}")


def check_format(state: dict, expected: str, source: str, trainer: str, *, untagged_ok: bool = False) -> None:
    """Raises ``CheckpointError`` unless ``state`` is tagged ``format=expected`` (``untagged_ok``: or not tagged,
    as files written before the tag was added)."""
    found = state.get("format")
    if found != expected and not (untagged_ok and found is None):
        raise CheckpointError(f"{source}: not a {trainer} checkpoint (format {found!r}, expected {expected!r})")


def restore_all_or_nothing(capture: Callable[[], Any], apply: Callable[[Any], None], state: Any, source: str,
                           group=None) -> None:
    """``apply(state)`` on every rank of ``group``; if it raises on any rank, every rank ``apply`` s a copy of what
    ``capture()`` returned before and raises ``CheckpointError``: the trainers are left as they were (collective
    when a process group is initialised)."""
    snapshot = copy.deepcopy(capture())
    error = None
    try:
        apply(state)
    except Exception as exc:
        error = CheckpointError(f"{source}: could not be loaded ({type(exc).__name__}: {exc}); nothing was changed")
        error.__cause__ = exc
    try:
        agree(error, f"loading {source}", group)
    except CheckpointError:
        apply(snapshot)
        if error is not None:
            raise error from error.__cause__
        raise
