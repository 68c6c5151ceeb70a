"""Scenarios the FSDP tests run on real processes (``pytrain.trainers.spawn``, gloo, 2 or 4 ranks).

Spawned processes import their function by module name, so the scenarios live here.  ``runs`` trains several
``pytrain train`` configurations (``pytrain.train.run``) in one launch (a launch costs seconds of start-up);
``failed_save`` checks that a checkpoint write that fails part-way leaves the previous checkpoint the latest and
loadable; ``trainer_errors`` collects the FSDPTrainer's errors for misuse.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from ..optim import FusedAdamW
from ..train import GPT, TrainConfig, corpus_splits, lm_loss, run
from ..trainers import FSDPTrainer, shard_model
from ..trainers import sharded_checkpoint as sc
from ..trainers.checkpoint import CheckpointError, checkpoint_paths

#: the tiny GPT of these tests: ``pytrain train`` flags
TINY = ["--size", "tiny", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--batch", "8",
        "--no-progress", "--watchdog-timeout", "60"]


def config(*flags: str) -> TrainConfig:
    return TrainConfig.from_args([*TINY, *flags])


def runs(cfgs: List[TrainConfig]) -> List[dict]:
    """The summaries of ``cfgs``, trained one after the other on the launch's ranks."""
    return [dict(run(cfg)) for cfg in cfgs]


def _trainer(checkpoint_dir: str, resume: bool = False) -> FSDPTrainer:
    torch.manual_seed(0)
    train_data, _, vocab = corpus_splits(16)
    model = GPT(vocab, 2, 32, 2, 16)
    shard_model(model, model.blocks)
    return FSDPTrainer(model, FusedAdamW(model.parameters(), lr=1e-2), lm_loss, train_data, batch_size=8,
                       max_steps=4, checkpoint_dir=checkpoint_dir, resume=resume, watchdog_timeout=None)


def _params(model: nn.Module) -> List[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


class _Injected(RuntimeError):
    pass


def failed_save(tmp: str) -> Dict[str, object]:
    """Trains 2 steps and checkpoints; trains a third and checkpoints again with a failure injected after every
    rank wrote its shards (rank 0's ``trainer.pt`` write raises, as a crash there would end it); then a new
    trainer resumes.  Returns the error, what the directory holds, and the resumed step and parameters."""
    trainer = _trainer(tmp)
    trainer.fit(stop_after=2)
    trainer.save_checkpoint()
    at_two = _params(trainer.model)
    trainer.fit(stop_after=3)
    original = sc.ckpt.atomic_save

    def crash(*args, **kwargs):
        raise _Injected("injected failure before trainer.pt")

    sc.ckpt.atomic_save = crash
    try:
        trainer.save_checkpoint()
        error = "no error"
    except CheckpointError as exc:
        error = str(exc)
    finally:
        sc.ckpt.atomic_save = original
        trainer.close()
    names = sorted(p.name for p in Path(tmp).iterdir())
    latest = [p.name for p in checkpoint_paths(tmp, sc.SUFFIX)]
    resumed = _trainer(tmp, resume=True)
    resumed.close()
    return {"error": error, "names": names, "latest": latest, "resumed_step": resumed.step, "at_two": at_two,
            "params": _params(resumed.model)}


def resume_and_failures(cfg: TrainConfig, tmp: str) -> Dict[str, object]:
    """One launch for three checks: ``cfg`` (a resumed run), ``failed_save`` and ``trainer_errors``."""
    return {"run": dict(run(cfg)), "failed_save": failed_save(tmp), "errors": trainer_errors()}


def trainer_errors() -> Dict[str, str]:
    """The ValueError text of each misuse of FSDPTrainer / shard_model."""
    out = {}

    def error(name, fn):
        try:
            fn()
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)

    train_data, _, vocab = corpus_splits(16)
    plain = GPT(vocab, 1, 32, 2, 16)
    error("plain model", lambda: FSDPTrainer(plain, FusedAdamW(plain.parameters()), lm_loss, train_data,
                                             batch_size=8))
    early = GPT(vocab, 1, 32, 2, 16)
    opt = FusedAdamW(early.parameters())
    shard_model(early, early.blocks)
    error("optimizer before sharding", lambda: FSDPTrainer(early, opt, lm_loss, train_data, batch_size=8))
    good = opt.__class__(early.parameters())
    error("comm hook", lambda: FSDPTrainer(early, good, lm_loss, train_data, batch_size=8, comm_hook="powersgd"))
    error("fp16", lambda: FSDPTrainer(early, good, lm_loss, train_data, batch_size=8, precision="fp16"))
    error("sharded twice", lambda: shard_model(early, early.blocks))
    other = GPT(vocab, 1, 32, 2, 16)
    error("foreign block", lambda: shard_model(GPT(vocab, 1, 32, 2, 16), other.blocks))
    return out
