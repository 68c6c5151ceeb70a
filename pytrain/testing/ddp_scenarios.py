"""Scenarios the DDPTrainer tests run on real processes (``pytrain.trainers.spawn``, gloo, 2 ranks).

Spawned processes import their function by module name, so the scenarios live here rather
than in the test file.  Each scenario runs several trainer configurations in one launch (a
launch costs seconds of process start-up) and returns plain results the test asserts on.

The problem: regression of y = x w + noise with an MLP; ``dropout=True`` adds a dropout
layer so that resumed runs must also restore the RNG streams.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from ..optim import FusedAdamW
from ..trainers import DDPTrainer
from ..trainers.checkpoint import CheckpointError, atomic_save, latest_checkpoint, load_checkpoint

SAMPLES, FEATURES, BATCH, LR, CLIP = 192, 8, 32, 2e-2, 1.0


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = x @ torch.randn(FEATURES, generator=g) + 0.1 * torch.randn(SAMPLES, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def model(dropout: bool = False, hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(FEATURES, hidden), nn.Tanh()] + ([nn.Dropout(0.2)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(hidden, 1), nn.Flatten(0))


def trainer(net: nn.Module, loss_fn=nn.functional.mse_loss, optimizer=None, **kwargs) -> DDPTrainer:
    opts = dict(batch_size=BATCH, max_steps=12, lr_schedule="cosine", warmup_steps=2, max_grad_norm=CLIP, seed=3)
    opts.update(kwargs)
    optimizer = optimizer if optimizer is not None else FusedAdamW(net.parameters(), lr=LR)
    return DDPTrainer(net, optimizer, loss_fn, dataset(), **opts)


def params(net: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, CheckpointError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _powersgd_hook():
    """A PowerSGD (state, hook) that compresses from the third step (None if pytrain.comm lacks it)."""
    try:
        from ..comm import PowerSGDState, powersgd_hook
    except ImportError:
        return None
    return PowerSGDState(None, rank=2, start_iter=2), powersgd_hook


def accumulation() -> Dict[str, object]:
    """Plain runs with grad_accum 1 and 4 (same global batch), bf16 and fp16 runs, early stopping, and the
    batch check."""
    out: Dict[str, object] = {}
    for accum in (1, 4):
        net = model()
        run = trainer(net, grad_accum=accum)
        summary = run.fit()
        out[f"accum{accum}"] = {"params": params(net), "losses": [r["loss"] for r in run.history], **summary}
    for precision in ("bf16", "fp16"):
        net = model()
        run = trainer(net, precision=precision, max_steps=8)
        run.fit()
        out[precision] = {"losses": [r["loss"] for r in run.history], "scale": run.scaler.get_scale()
                          if run.scaler.is_enabled() else None}
    # early stopping: no evaluation can beat the first by min_delta, so patience 2 stops after the third
    run = trainer(model(), val_data=dataset(), eval_every=1, patience=2, min_delta=1e9)
    summary = run.fit()
    out["early"] = {"steps": summary["steps"], "stopped": summary["stopped_early"],
                    "evaluated": sum("val_loss" in r for r in run.history)}
    out["bad_batch"] = _error(lambda: trainer(model(), batch_size=30, grad_accum=4))
    return out


def _resumable(directory: Path, **kwargs) -> DDPTrainer:
    torch.manual_seed(100 + dist.get_rank())  # per-rank dropout streams
    return trainer(kwargs.pop("net"), checkpoint_dir=str(directory), checkpoint_every=4, keep_last=2,
                   comm_hook=_powersgd_hook(), **kwargs)


def resume(tmp: str) -> Dict[str, object]:
    """Uninterrupted run vs. one stopped after step 10 and resumed (from the step-8, mid-epoch checkpoint),
    then loads of unreadable and mismatched checkpoints."""
    tmp = Path(tmp)
    full = model(dropout=True)
    _resumable(tmp / "full", net=full).fit()
    _resumable(tmp / "cut", net=model(dropout=True)).fit(stop_after=10)
    resumed_net = model(dropout=True, seed=123)  # a different start: everything must come from the checkpoint
    resumed = _resumable(tmp / "cut", net=resumed_net, resume=True)
    start = {"step": resumed.step, "epoch": resumed.epoch, "batch_in_epoch": resumed.batch_in_epoch}
    resumed.fit()
    out = {"full": params(full), "resumed": params(resumed_net), "resumed_from": start,
           "kept": sorted(p.name for p in (tmp / "full").iterdir())}
    out.update(_bad_checkpoints(tmp, latest_checkpoint(tmp / "full")))
    return out


def _other_optimizer_state(model_state: dict) -> dict:
    """The state dict of an SGD with momentum (another optimizer type) after one step on the same model."""
    net = model(dropout=True)
    net.load_state_dict(model_state)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    sgd.step()
    return {"optimizer": sgd.state_dict(), "optimizer_class": "torch.optim.sgd.SGD"}


def _bad_checkpoints(tmp: Path, good: Path) -> Dict[str, object]:
    """Errors from unreadable, insane and mismatched checkpoints, and whether the trainer's model and optimizer
    stayed untouched."""
    state = load_checkpoint(good)
    opt = state["optimizer"]
    variants = {"world": {**state, "world_size": 4},
                "scheduler": {**state, "scheduler": {"bogus": 1}},  # fails after model + optimizer were loaded
                "shape": {**state, "model": {k: v[..., :1] for k, v in state["model"].items()}},
                "nan": {**state, "model": {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}},
                "step": {**state, "step": -5},
                "optimizer": {**state, **_other_optimizer_state(state["model"])},
                "states": {**state, "optimizer": {**opt, "state": {i: {k: v[..., :1] if v.dim() else v
                                                                       for k, v in s.items()}
                                                                   for i, s in opt["state"].items()}}}}
    paths = {"garbage": tmp / "garbage.pt", "truncated": tmp / "truncated.pt"}
    if dist.get_rank() == 0:
        paths["garbage"].write_bytes(b"not a checkpoint at all")
        paths["truncated"].write_bytes(good.read_bytes()[:1000])
        for name, variant in variants.items():
            atomic_save(variant, tmp / f"{name}.pt")
    dist.barrier()
    out = {}
    for name in [*paths, *variants]:
        net = model(dropout=True, seed=7)
        before = params(net)
        opt = FusedAdamW(net.parameters(), lr=LR)
        out[f"error_{name}"] = _error(lambda: trainer(net, optimizer=opt, comm_hook=_powersgd_hook(),
                                                      resume=str(tmp / f"{name}.pt")))
        out[f"untouched_{name}"] = all(torch.equal(a, b) for a, b in zip(before, params(net))) and not opt.state
    return out
