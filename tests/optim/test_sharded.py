"""Fused optimizers on DTensor params, on 4 and 2 real gloo processes (tests/optim/sharded_worker.py).

Checked, over 20 steps: FusedAdamW (fp32 with clipping, bf16 params with fp32 masters and clipping), FusedLARS
(LARS and LARC with Nesterov) and FusedLAMB (with clipping) on FSDP2-like Shard(0), tensor-parallel
Shard/Replicate and 2-D (2 x 2 mesh) placements end equal to the same optimizer on the plain full tensors;
the global grad norm is the whole-model one; a NaN in one rank's shard skips the step on every rank; int8
states are per local shard (equal to FusedAdamW on the local shards); a model wrapped with ``fully_shard``
trains as the unwrapped one; a run checkpointed with torch.distributed.checkpoint on 4 ranks and resumed on
2 ends where the uninterrupted 4-rank run ends.

Two launches (process start-up dominates): 4 ranks (layouts incl. 2-D, the checkpoint save), then 2 ranks
(layouts, fully_shard, the resume).
"""
import sys
from pathlib import Path

import pytest
import torch

from pytrain.testing.processes import launch_ranks
from pytrain.testing.tolerances import assert_close

WORKER = Path(__file__).with_name("sharded_worker.py")
LAUNCH_TIMEOUT_S = 420  # generous for a loaded 2-core machine; a hung collective fails after 90 s anyway
sys.path.insert(0, str(WORKER.parent))
import sharded_worker as worker  # noqa: E402  (the scenario tables, for parametrizing)

sys.path.pop(0)
INT8_RESUME_RTOL = 2e-3  # a resume on another world size re-blocks the int8 moments (requantization error)


def launch(tmp: Path, world: int, *scenarios: str) -> list:
    """Results of every rank (index = rank) of the worker's ``scenarios`` on ``world`` gloo processes."""
    return launch_ranks(WORKER, world, tmp, *scenarios, timeout_s=LAUNCH_TIMEOUT_S, what="sharded optimizer worker")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def four(workdir):
    return launch(workdir, 4, "layouts", "dcp_save")


@pytest.fixture(scope="module")
def two(workdir, four):  # after ``four``: it resumes the checkpoints the 4-rank launch wrote
    return launch(workdir, 2, "layouts", "fsdp_model", "dcp_load")


def ranks_of(request, world):
    return request.getfixturevalue({4: "four", 2: "two"}[world])


CASES = [(world, layout, name) for world in (4, 2) for layout in worker.LAYOUTS if layout != "2d" or world == 4
         for name in list(worker.OPTIMIZERS) + ["adamw_clip_nan"]]


@pytest.mark.parametrize("world, layout, name", CASES)
def test_sharded_equals_unsharded(request, world, layout, name):
    for rank, results in enumerate(ranks_of(request, world)):
        r = results["layouts"][(layout, name)]
        for i, (got, want) in enumerate(zip(r["sharded"], r["ref"])):
            assert_close(got, want, msg=f"rank {rank} param {i} {worker.SHAPES[i]}")
        for got, want in zip(r["masters"], r["ref_masters"]):
            assert_close(got, want, msg=f"rank {rank} master")
        assert len(r["masters"]) == len(r["ref_masters"])
        norm, ref_norm = r["grad_norm"]
        if ref_norm is not None:  # the whole model's norm, not the local shards'
            assert norm == pytest.approx(ref_norm, rel=1e-6)


@pytest.mark.parametrize("world, layout", [(w, lay) for w, lay, n in CASES if n == "adamw_clip"])
def test_nonfinite_shard_skips_on_every_rank(request, world, layout):
    for results in ranks_of(request, world):
        skipped = results["layouts"][(layout, "adamw_clip_nan")]["skipped"]
        assert skipped == [(s == worker.NAN_STEP, s == worker.NAN_STEP) for s in range(worker.STEPS)]


@pytest.mark.parametrize("world, layout", [(w, lay) for w, lay, n in CASES if n == "adamw_clip"])
def test_int8_states_per_local_shard(request, world, layout):
    for results in ranks_of(request, world):
        r = results["layouts"][(layout, "int8_per_shard")]
        for got, want in zip(r["sharded"], r["ref"]):
            assert torch.equal(got, want)
        for got, want in zip(r["codes"], r["ref_codes"]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["adamw_clip", "lamb_clip"])
def test_fully_shard_model_trains_like_unsharded(two, name):
    for results in two:
        r = results["fsdp_model"][name]
        for got, want in zip(r["sharded"], r["ref"]):
            assert_close(got, want)


@pytest.mark.parametrize("name", worker.DCP_OPTIMIZERS + ("adamw_int8",))
def test_checkpoint_on_4_ranks_resumes_on_2(four, two, name):
    uninterrupted = four[0]["dcp_save"][name]
    for results in two:
        for got, want in zip(results["dcp_load"][name], uninterrupted):
            if name == "adamw_int8":
                torch.testing.assert_close(got, want, rtol=INT8_RESUME_RTOL, atol=INT8_RESUME_RTOL)
            else:
                assert_close(got, want)
