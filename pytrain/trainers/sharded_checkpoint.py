"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, published atomically.

A sharded checkpoint is a directory ``step-<step>.dcp`` holding DCP's files (every rank writes its shards; rank 0
the ``.metadata``) and ``trainer.pt``, a checksummed pytrain checkpoint file (``checkpoint.atomic_save``) with
everything that is not a sharded tensor: counters, settings, scheduler and per-rank RNG states.

Writing (``save_sharded``, collective): rank 0 names a temporary directory beside the destination
(``.step-<step>.dcp.tmp-<pid>@<host>-<hex>``, the pattern of ``checkpoint.TEMP_RE``) and tells the others; every
rank saves its shards there with ``dcp.save``; rank 0 then writes ``trainer.pt`` last, ``fsync`` s, renames the
directory to its final name and ``fsync`` s the parent.  A crash or a failure at any point before that rename
leaves only the temporary directory, which ``checkpoint_paths`` ignores (and ``prune`` removes once its writer is
gone): the last complete checkpoint stays the latest.  Every rank learns whether every step succeeded on every rank
(``state.agree``), so a failure raises a ``CheckpointError`` everywhere instead of a hang.

Reading (``load_sharded``, collective): ``trainer.pt`` (checksum verified), then ``dcp.load`` into copies of the
given state dicts, so a checkpoint that fails to load on any rank changes nothing.  DCP reshards on load: a
checkpoint written by N ranks loads onto M.  The directory must be visible to every rank (a shared file system
for multi-node jobs).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import checkpoint as ckpt
from . import state as st

SUFFIX = ".dcp"
META_NAME = "trainer.pt"


def _is_main() -> bool:
    return dist.get_rank() == 0


def _attempt(fn: Callable[[], Any]) -> Tuple[Any, Optional[BaseException]]:
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


def save_sharded(tensors: dict, meta: dict, path: Path, *, keep_last: Optional[int] = None,
                 prepare: Optional[Callable[[], None]] = None) -> None:
    """Writes ``tensors`` (state dicts of DTensors / tensors, as ``get_state_dict`` gives) with DCP and ``meta``
    (``trainer.pt``) as the checkpoint directory ``path``, atomically (see the module doc); rank 0 calls
    ``prepare()`` first and prunes the directory to ``keep_last`` sharded checkpoints after.  Collective."""
    path = Path(path)

    def make_temp() -> str:
        if prepare is not None:
            prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path.parent / f".{path.name}.tmp-{os.getpid()}@{ckpt._host()}-{secrets.token_hex(4)}")

    temp, error = _attempt(make_temp) if _is_main() else (None, None)
    st.agree(error, f"preparing checkpoint {path}")
    names: List[Any] = [temp]
    dist.broadcast_object_list(names, src=0)
    temp = Path(names[0])
    _, error = _attempt(lambda: dcp.save(tensors, checkpoint_id=str(temp)))
    st.agree(error, f"writing the shards of checkpoint {path}")
    error = _attempt(lambda: _publish(meta, temp, path, keep_last))[1] if _is_main() else None
    st.agree(error, f"publishing checkpoint {path}")


def _publish(meta: dict, temp: Path, path: Path, keep_last: Optional[int]) -> None:
    """Rank 0, once every shard is written: ``trainer.pt`` into ``temp``, then ``temp`` renamed to ``path``."""
    ckpt.atomic_save(meta, temp / META_NAME)
    if path.exists():  # the same step saved again (a resumed run): move the old one aside, then replace it
        aside = path.parent / f".{path.name}.tmp-{os.getpid()}@{ckpt._host()}-old"
        os.replace(path, aside)
        os.replace(temp, path)
        ckpt._unlink_quietly(aside)
    else:
        os.replace(temp, path)
    ckpt._fsync_dir(path.parent)
    if keep_last is not None:
        ckpt.prune(path.parent, keep_last, SUFFIX)


def _copy(tree: Any) -> Any:
    """``tree`` with every tensor (DTensors too) replaced by a detached copy."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy(v) for v in tree)
    return tree


def local_tensors(tree: Any) -> Any:
    """``tree`` with each DTensor replaced by this rank's local shard (for per-rank checks)."""
    if hasattr(tree, "to_local"):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: local_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_tensors(v) for v in tree)
    return tree


def load_sharded(path: Path, template: dict) -> Tuple[dict, dict]:
    """(``trainer.pt``'s dict, a copy of ``template`` filled from the checkpoint's shards); ``CheckpointError`` on
    every rank if any rank cannot read its part (nothing of ``template`` is changed).  Collective."""
    path = Path(path)
    meta, error = _attempt(lambda: ckpt.load_checkpoint(path / META_NAME))
    st.agree(error, f"reading {path}")
    loaded = _copy(template)
    _, error = _attempt(lambda: dcp.load(loaded, checkpoint_id=str(path)))
    st.agree(error, f"reading the shards of {path}")
    return meta, loaded
