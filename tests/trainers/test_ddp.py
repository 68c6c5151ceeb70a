"""DDPTrainer with real processes (gloo, 2 ranks): convergence, rank agreement, gradient accumulation
against one big batch, bit-identical resume, and clear errors for bad batches and for bad checkpoints (damaged,
insane, of another optimizer or shape: every rank raises, nothing is loaded).

Two launches (module fixtures) run every configuration (see ``pytrain.testing.ddp_scenarios``);
each test checks its part of the results.
"""
import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from pytrain.optim import FusedAdamW
from pytrain.testing import ddp_scenarios as sc
from pytrain.testing.tolerances import assert_close
from pytrain.trainers import spawn
from pytrain.trainers.schedules import build_scheduler

WORLD = 2


@pytest.fixture(scope="module")
def accum():
    return spawn(sc.accumulation, WORLD)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return spawn(sc.resume, WORLD, str(tmp_path_factory.mktemp("ckpt")))


def one_big_batch_reference(steps: int = 12) -> list:
    """Single-process training on the union of the ranks' shares of each global batch."""
    data = sc.dataset()
    per_rank = sc.BATCH // WORLD
    per_epoch = len(data) // WORLD // per_rank
    net = sc.model()
    opt = FusedAdamW(net.parameters(), lr=sc.LR, max_grad_norm=sc.CLIP)
    sched = build_scheduler("cosine", opt, steps, 2)
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        index = []
        for rank in range(WORLD):
            sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=3, drop_last=True)
            sampler.set_epoch(epoch)
            index += list(sampler)[k * per_rank:(k + 1) * per_rank]
        x, y = data[index]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
    return sc.params(net)


def test_loss_decreases(accum):
    for run in ("accum1", "accum4", "bf16", "fp16"):
        losses = accum[0][run]["losses"]
        assert all(torch.isfinite(torch.tensor(losses))), (run, losses)
        assert losses[-1] < 0.5 * losses[0], (run, losses)
    assert accum[0]["fp16"]["scale"] is not None  # the GradScaler ran


def test_ranks_hold_identical_params(accum, resumed):
    for run in ("accum1", "accum4"):
        for a, b in zip(accum[0][run]["params"], accum[1][run]["params"]):
            assert torch.equal(a, b), run
    for a, b in zip(resumed[0]["resumed"], resumed[1]["resumed"]):
        assert torch.equal(a, b)


def test_grad_accum_equals_one_big_batch(accum):
    expected = one_big_batch_reference()
    for run in ("accum1", "accum4"):
        for i, (got, want) in enumerate(zip(accum[0][run]["params"], expected)):
            assert_close(got, want, msg=f"{run} param {i}")


def test_interrupted_and_resumed_run_is_bit_identical(resumed):
    assert resumed[0]["resumed_from"] == {"step": 8, "epoch": 1, "batch_in_epoch": 2}  # mid-epoch
    for rank in range(WORLD):
        for i, (got, want) in enumerate(zip(resumed[rank]["resumed"], resumed[rank]["full"])):
            assert torch.equal(got, want), f"rank {rank} param {i}: max diff {(got - want).abs().max()}"


def _stopped_and_resumed_summaries(directory: str) -> tuple:
    """A run stopped after step 4 (checkpointed there), then resumed to step 6: both summaries, as dicts."""
    first = sc.trainer(sc.model(), comm_hook="allreduce", checkpoint_dir=directory, checkpoint_every=4, max_steps=6)
    stopped = first.fit(stop_after=4)
    resumed = sc.trainer(sc.model(), comm_hook="allreduce", checkpoint_dir=directory, max_steps=6, resume=True)
    return dict(stopped), dict(resumed.fit()), repr(resumed.summary())


def test_resumed_summary_counts_this_run(tmp_path):
    """A resumed trainer's summary: the steps and bytes of its own run (the hook's byte counters are restored from
    the checkpoint, so they are subtracted), not the whole run as if all were just done."""
    stopped, resumed, text = spawn(_stopped_and_resumed_summaries, WORLD, str(tmp_path))[0]
    assert (stopped["steps"], stopped["start_step"], stopped["steps_run"]) == (4, 0, 4)
    assert (resumed["steps"], resumed["start_step"], resumed["steps_run"]) == (6, 4, 2)
    assert resumed["bytes_uncompressed"] * 2 == stopped["bytes_uncompressed"] > 0  # every step sends the same
    assert text.startswith("TrainSummary(2 steps (steps 5-6, resumed from step 4) on 2 ranks, loss "), text


def test_keeps_last_k_checkpoints(resumed):
    assert resumed[0]["kept"] == [".pytrain.lock", "step-00000008.pt", "step-00000012.pt"]  # and the lock file


def test_early_stopping(accum):
    assert accum[0]["early"] == {"steps": 3, "stopped": True, "evaluated": 3}


def lr_trace(schedule: str, steps: int, warmup: int) -> list:
    opt = FusedAdamW(sc.model().parameters(), lr=1.0)
    sched = build_scheduler(schedule, opt, total_steps=steps, warmup=warmup)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules():
    lrs = lr_trace("cosine", 12, 2)
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    peaks = lr_trace("onecycle", 10, 3)
    assert max(peaks) == pytest.approx(1.0) and peaks.index(max(peaks)) == 2  # full lr at warmup - 1, as cosine
    opt = FusedAdamW(sc.model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        build_scheduler("linear", opt, 10)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        build_scheduler("cosine", opt, 10, warmup=10)


def test_batch_not_divisible_by_world_size(accum):
    assert "batch_size 30 is not divisible by 2 data-parallel ranks x grad_accum 4" in accum[0]["bad_batch"]


@pytest.mark.parametrize("name, message", [
    ("garbage", "garbage.pt is not a pytrain checkpoint file"),
    ("truncated", r"truncated.pt is truncated: 948 of \d+ payload bytes"),
    ("world", "written with world_size=4, this run has world_size=2"),
    ("shape", "model does not match the checkpoint"),
    ("scheduler", "could not be loaded"),
    ("nan", r"model 0.weight has 256 non-finite \(NaN/Inf\) of 256 values"),
    ("step", r"step=-5 is not an int in \[0, inf\)"),
    ("optimizer", "holds the state of a torch.optim.sgd.SGD optimizer, this run uses pytrain.optim.adamw.FusedAdamW"),
    ("states", r"optimizer state 'exp_avg' of parameter 0 has shape \(32, 1\), the parameter has \(32, 8\)"),
])
def test_bad_checkpoint_is_a_clear_error_and_loads_nothing(resumed, name, message):
    for rank in range(WORLD):
        assert resumed[rank][f"error_{name}"].startswith("CheckpointError"), resumed[rank][f"error_{name}"]
        assert re.search(message, resumed[rank][f"error_{name}"]), resumed[rank][f"error_{name}"]
        assert resumed[rank][f"untouched_{name}"]
