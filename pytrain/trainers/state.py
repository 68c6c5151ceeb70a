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
* Reading: ``check_format`` (is it this trainer's payload?), ``resume_path`` (which file ``resume=`` means)
  and ``restore_all_or_nothing`` (apply a payload; on any error put the previous state back).
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

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
def save_collective(state: Optional[dict], path: PathLike, *, writer: bool, keep_last: Optional[int] = None) -> None:
    """Writes ``state`` to ``path`` atomically on the ranks where ``writer`` is true (creating the directory and
    pruning it to ``keep_last`` checkpoints when given), then tells every rank of the default group whether all
    writes succeeded (collective).  A failed write raises its own error on its rank and a ``CheckpointError``
    naming that rank on the others, so none waits forever."""
    path, error = Path(path), None
    if writer:
        try:
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
def resume_path(resume: Union[bool, PathLike], directory: Optional[PathLike]) -> Optional[Path]:
    """The checkpoint ``resume`` names: True, the latest in ``directory`` (None if there is none); a path, itself."""
    return latest_checkpoint(directory) if resume is True else Path(resume)


def check_format(state: dict, expected: str, source: str, trainer: str, *, untagged_ok: bool = False) -> None:
    """Raises ``CheckpointError`` unless ``state`` is tagged ``format=expected`` (``untagged_ok``: or not tagged,
    as files written before the tag was added)."""
    found = state.get("format")
    if found != expected and not (untagged_ok and found is None):
        raise CheckpointError(f"{source}: not a {trainer} checkpoint (format {found!r}, expected {expected!r})")


def restore_all_or_nothing(capture: Callable[[], Any], apply: Callable[[Any], None], state: Any, source: str) -> None:
    """``apply(state)``; if it raises, ``apply`` a copy of what ``capture()`` returned before and raise
    ``CheckpointError``: the trainer is left as it was."""
    snapshot = copy.deepcopy(capture())
    try:
        apply(state)
    except Exception as exc:
        apply(snapshot)
        raise CheckpointError(f"{source}: could not be loaded ({type(exc).__name__}: {exc}); "
                              "nothing was changed") from exc
