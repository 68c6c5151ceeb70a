"""``pytrain train --shard fsdp`` (FSDPTrainer on FSDP2) on real gloo processes, tiny GPT, 10 steps.

* Sharding changes no maths: the loss, gradient norm and validation loss of every step of a 2-process FSDP run equal
  the DDP run of the same config (FusedAdamW with fp32 and bf16 states, clipping, cosine warmup, evaluation;
  FusedLAMB with gradient accumulation; with and without resharding after forward; attention dropout with
  activation checkpointing in the FSDP run only: the recompute redraws the same masks).  int8 states are per local
  shard, so that run only has to train.
* Sharded checkpoints: a run checkpointed on 4 processes resumes on 2 and continues with the loss curve of the
  uninterrupted 4-process run; a checkpoint write that fails after the shards are written leaves the previous
  checkpoint the latest, and a resume loads it.
* Tensor parallelism (``--tp 2``: heads and MLP columns split, flash attention on the local heads): alone on 2
  processes it equals DDP; as DP x TP on a 2 x 2 mesh of 4 processes it equals plain FSDP on 4.
* Misuse (an unsharded model, an optimizer built before sharding, a DDP hook, fp16) is a clear error.

Three launches (see ``pytrain.testing.fsdp_scenarios``): 2 ranks (the DDP/FSDP pairs), 4 ranks (the checkpointed
run), 2 ranks (the resume, the failed save, the errors).
"""
import json
import shutil

import pytest
import torch

from pytrain.testing import fsdp_scenarios as sc
from pytrain.trainers import spawn

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, reduce-scatter vs all-reduce summation order over 10 steps
STEPS = ["--steps", "10", "--eval-every", "5"]
PAIRS = {  # name -> (flags of both runs, flags of the FSDP run only); the DDP run adds --hook none
    "adamw_fp32": ([], []),
    "adamw_bf16_states_no_reshard": (["--state-dtype", "bfloat16"], ["--no-reshard-after-forward"]),
    "lamb_accum": (["--optimizer", "lamb", "--grad-accum", "2", "--schedule", "constant"], []),
    "dropout_activation_checkpointing": (["--dropout", "0.1"], ["--activation-checkpointing"]),
    "tensor_parallel_2": ([], ["--tp", "2"]),  # 2 processes: 1 data-parallel group, 2 tensor-parallel ranks
}


def records(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    cfgs = []
    for name, (flags, only_fsdp) in PAIRS.items():
        shard = ["--shard", "fsdp", *only_fsdp]
        cfgs.append(sc.config(*STEPS, *flags, "--hook", "none", "--log-file", str(tmp / f"{name}.ddp")))
        cfgs.append(sc.config(*STEPS, *flags, *shard, "--log-file", str(tmp / f"{name}.fsdp")))
    cfgs.append(sc.config(*STEPS, "--state-dtype", "int8", "--shard", "fsdp", "--log-file", str(tmp / "int8.fsdp")))
    summaries = spawn(sc.runs, 2, cfgs)[0]
    return tmp, summaries


@pytest.mark.parametrize("name", PAIRS)
def test_fsdp_loss_curve_equals_ddp(pairs, name):
    tmp, _ = pairs
    (ddp, ddp_val), (fsdp, fsdp_val) = records(tmp / f"{name}.ddp"), records(tmp / f"{name}.fsdp")
    assert [r["step"] for r in fsdp] == list(range(1, 11))
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([r[key] for r in fsdp], dtype=torch.float64),
                                   torch.tensor([r[key] for r in ddp], dtype=torch.float64), **TOL, msg=key)
    assert [r["step"] for r in fsdp_val] == [5, 10]
    torch.testing.assert_close([r["val_loss"] for r in fsdp_val], [r["val_loss"] for r in ddp_val], **TOL)
    assert fsdp[-1]["loss"] < fsdp[0]["loss"]


def test_fsdp_int8_states_train(pairs):
    tmp, summaries = pairs
    steps, _ = records(tmp / "int8.fsdp")
    losses = [r["loss"] for r in steps]
    assert len(losses) == 10 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2, losses  # the fp32 run falls by about 0.47 over these steps
    assert summaries[-1]["cost_model"].startswith("models DDP steps")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 4-process run of 10 steps checkpointed at 5 and 10; its step-10 checkpoint removed, 2 processes resume."""
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = tmp / "ckpt"
    common = [*STEPS, "--shard", "fsdp", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    spawn(sc.runs, 4, [sc.config(*common, "--log-file", str(tmp / "four"), "--nproc", "4"),
                       sc.config(*STEPS, "--shard", "fsdp", "--tp", "2", "--nproc", "4", "--log-file", str(tmp / "2d"),
                                 "--checkpoint-dir", str(tmp / "ckpt2d"))])
    assert sorted(p.name for p in ckpt.iterdir()) == [".pytrain.lock", "step-00000005.dcp", "step-00000010.dcp"]
    shutil.rmtree(ckpt / "step-00000010.dcp")
    out = spawn(sc.resume_and_failures, 2, sc.config(*common, "--resume", "--log-file", str(tmp / "two")),
                str(tmp / "failed"))[0]
    return tmp, out


def test_checkpoint_on_4_processes_resumes_on_2(resumed):
    tmp, out = resumed
    four, _ = records(tmp / "four")
    two, two_val = records(tmp / "two")
    assert [r["step"] for r in two] == list(range(6, 11))
    assert (out["run"]["start_step"], out["run"]["world_size"]) == (5, 2)
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in four[5:]], **TOL)
    torch.testing.assert_close([r["lr"] for r in two], [r["lr"] for r in four[5:]], **TOL)
    assert [r["step"] for r in two_val] == [10]
    assert (tmp / "ckpt" / "step-00000010.dcp" / "trainer.pt").is_file()  # the resumed run's own


def test_dp_x_tp_on_a_2d_mesh_equals_fsdp(resumed):
    """4 processes as 2 data-parallel groups x 2 tensor-parallel ranks: the loss curve of plain FSDP on 4."""
    tmp, _ = resumed
    (four, _), (two_d, _) = records(tmp / "four"), records(tmp / "2d")
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([r[key] for r in two_d], [r[key] for r in four], **TOL, msg=key)
    assert (tmp / "ckpt2d" / "step-00000010.dcp" / "trainer.pt").is_file()


def test_failed_save_keeps_the_last_complete_checkpoint(resumed):
    _, out = resumed
    r = out["failed_save"]
    assert "publishing checkpoint" in r["error"] and "injected failure before trainer.pt" in r["error"], r["error"]
    assert r["latest"] == ["step-00000002.dcp"]
    assert any(n.startswith(".step-00000003.dcp.tmp-") for n in r["names"]), r["names"]  # the partial write
    assert r["resumed_step"] == 2
    for got, want in zip(r["params"], r["at_two"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case, message", [
    ("plain model", "the model must be sharded first (shard_model or fully_shard), got a plain GPT"),
    ("optimizer before sharding", "of the optimizer's parameters are not the sharded model's"),
    ("comm hook", "comm_hook 'powersgd' is a DDP gradient-communication hook"),
    ("fp16", "precision 'fp16' is not supported"),
    ("sharded twice", "the model is already sharded"),
    ("foreign block", "blocks must be submodules of the model"),
])
def test_misuse_is_a_clear_error(resumed, case, message):
    assert message in resumed[1]["errors"][case]
