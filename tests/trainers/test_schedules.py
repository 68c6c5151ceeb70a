"""The learning-rate schedules of ``pytrain.trainers.schedules`` against their formulas and against
``torch.optim.lr_scheduler`` driven by hand, and the plateau schedule driving ``DDPTrainer`` (one rank)."""
import math

import pytest
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import ReduceLROnPlateau

from pytrain.trainers import DDPTrainer
from pytrain.trainers.schedules import SCHEDULES, build_scheduler, steps_on_validation


def trace(schedule: str, steps: int, warmup: int, lr: float = 2.0) -> list:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr)
    sched = build_scheduler(schedule, opt, total_steps=steps, warmup=warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cyclic_is_triangular():
    s, lr = 3, 2.0  # half cycle of s = warmup steps, between lr/10 and lr (Smith 2017, eq. in section 3.1)
    expected = []
    for t in range(20):
        x = abs(t / s - 2 * math.floor(1 + t / (2 * s)) + 1)
        expected.append(lr / 10 + (lr - lr / 10) * max(0.0, 1 - x))
    assert trace("cyclic", 20, s) == pytest.approx(expected)
    assert trace("cyclic", 20, 0) == pytest.approx(  # no warmup: half cycle T/10
        [lr / 10 + 0.9 * lr * max(0.0, 1 - abs(t / 2 - 2 * math.floor(1 + t / 4) + 1)) for t in range(20)])


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_step_decay(warmup):
    steps, lr = 20, 2.0
    warmup = warmup if warmup > 1 else 0  # one warmup step is the full lr: no warmup
    after = steps - warmup
    expected = [lr * (t + 1) / warmup if t < warmup else
                lr * 0.1 ** ((t - warmup >= after // 2) + (t - warmup >= 3 * after // 4)) for t in range(steps)]
    assert trace("step", steps, warmup or 1) == trace("step", steps, warmup) == pytest.approx(expected)


def test_plateau_and_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    sched = build_scheduler("plateau", opt, 10)
    assert steps_on_validation(sched) and not steps_on_validation(build_scheduler("step", opt, 10))
    lrs = []
    for val in [3.0, 2.0, 2.5, 2.4, 1.0, 1.5, 1.2, 1.1]:
        sched.step(val)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]  # halved after 2 validations without improvement
    with pytest.raises(ValueError, match="plateau schedule takes no warmup"):
        build_scheduler("plateau", opt, 10, warmup=2)
    for name in ("cyclic", "step"):
        with pytest.raises(ValueError, match="warmup_steps must be in"):
            build_scheduler(name, opt, 10, warmup=10)
    assert set(SCHEDULES) == {"constant", "cosine", "onecycle", "cyclic", "step", "plateau"}


def test_plateau_drives_the_trainer(monkeypatch):
    """The trainer steps ReduceLROnPlateau with each validation loss and not per step: its lr trace is what
    torch's scheduler gives on the same validation losses."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = list(zip(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 * torch.randn(64)))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    try:
        trainer = DDPTrainer(model, opt, lambda out, y: torch.nn.functional.mse_loss(out.squeeze(-1), y), data,
                             batch_size=16, val_data=data[:16], lr_schedule="plateau", max_steps=24, eval_every=2,
                             epochs=6, watchdog_timeout=None)
        trainer.fit()
        history = trainer.history
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    reference = ReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3), factor=0.5,
                                  patience=1)
    expected = []
    for record in history:
        expected.append(reference.optimizer.param_groups[0]["lr"])
        if "val_loss" in record:
            reference.step(record["val_loss"])
    assert [r["lr"] for r in history] == pytest.approx(expected)
    assert min(expected) < 0.3  # the run reached a plateau, so the trace says something
