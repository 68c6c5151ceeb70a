"""DDP communication hooks on 2 real gloo processes (tests/comm/ddp_worker.py runs every scenario in one launch).

Checked: each hook trains the worker's MLP (see ddp_worker.py for model and data) to within 5% of plain DDP's
final loss with several buckets in flight (a hang fails on the gloo timeout / the launch timeout), every rank ends
with identical parameters, allreduce_hook equals DDP's default, the PowerSGD hook's averaged gradients equal
torch's powerSGD_hook's (same settings and seed, one bucket), NaN gradients stay non-finite, state save / load
round trips bitwise, and bad states / inputs raise clear errors.  On one rank: the ordered worker's pipelined
schedule (which stage of which bucket runs when, when futures complete), its failure path, that it keeps
no finished job alive, and that the interpreter's exit waits (bounded) for its running job.
"""
import gc
import math
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from pytrain.comm import HOOK_NAMES, PowerSGDState, QuantState, TopKState, make_hook
from pytrain.comm.hooks._common import _ORDERED, HookState
from pytrain.testing.processes import launch_ranks
from pytrain.testing.tolerances import tolerance

WORKER = Path(__file__).with_name("ddp_worker.py")
LAUNCH_TIMEOUT_S = 420  # generous for a loaded 2-core machine; a hung collective fails after 60 s anyway
LOSS_TOLERANCE = 0.05
COMPRESSED_STEPS = slice(2, None)  # torch comparison: start_iter=2, so steps 2.. are compressed


def launch(tmp: Path, *scenarios: str) -> list:
    """Run the worker's scenarios (all of test_hooks' when none are named) on 2 gloo ranks writing into ``tmp``;
    the results of both ranks (index = rank)."""
    return launch_ranks(WORKER, 2, tmp, *scenarios, timeout_s=LAUNCH_TIMEOUT_S, what="DDP hook worker")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both ranks (index = rank), from one launch of the worker."""
    return launch(tmp_path_factory.mktemp("ddp_hooks"))


CONVERGENCE = ["allreduce", "powersgd", "topk", "topk_exact", "int8", "fp8_e4m3"]


@pytest.mark.parametrize("name", CONVERGENCE)
def test_final_loss_close_to_plain_ddp(ranks, name):
    base, ours = ranks[0]["train"]["default"], ranks[0]["train"][name]
    assert ours["buckets"] >= 3, f"{name}: only {ours['buckets']} buckets: no several buckets in flight"
    assert abs(ours["loss"] / base["loss"] - 1) <= LOSS_TOLERANCE, (name, ours["loss"], base["loss"])


@pytest.mark.parametrize("name", CONVERGENCE)
def test_ranks_end_identical(ranks, name):
    assert torch.equal(ranks[0]["train"][name]["params"], ranks[1]["train"][name]["params"])


def test_allreduce_hook_is_ddp_default(ranks):
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(ranks[0]["train"]["allreduce"]["params"], ranks[0]["train"]["default"]["params"],
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("name, at_least", [("allreduce", 1.0), ("powersgd", 4.0), ("topk", 20.0),
                                            ("int8", 3.5), ("fp8_e4m3", 3.5)])
def test_compression_ratio(ranks, name, at_least):
    ratio = ranks[0]["train"][name]["ratio"]
    assert ratio >= at_least and (name != "allreduce" or ratio == 1.0), (name, ratio)


def test_powersgd_matches_torch(ranks):
    """Averaged gradients of the first compressed steps (warm start and error feedback in play from the 2nd)."""
    for r in ranks:
        theirs, ours = r["torch_powersgd"]["torch"], r["torch_powersgd"]["pytrain"]
        for step, (a, b) in enumerate(zip(theirs[COMPRESSED_STEPS], ours[COMPRESSED_STEPS])):
            rel = float((a - b).norm() / a.norm())
            assert rel <= 1e-5, f"compressed step {step}: relative difference {rel:.2e}"
        assert all(torch.equal(a, b) for a, b in zip(theirs[:2], ours[:2]))  # plain steps: identical


@pytest.mark.parametrize("name", ["allreduce", "powersgd", "topk", "int8"])
def test_nan_gradient_never_becomes_finite(ranks, name):
    for r in ranks:
        result = r["nan"][name]
        assert not result["nan_step_finite"]["module.0.weight"], f"{name}: NaN on rank 1 vanished"
        assert result["next_step_finite"], f"{name}: the NaN step poisoned the next one"


@pytest.mark.parametrize("name", ["powersgd", "topk", "int8"])
def test_state_save_load_round_trip(ranks, name):
    for r in ranks:
        result = r["save_load"][name]
        assert result["iter"] == (14, 14)
        assert torch.equal(result["continued"], result["resumed"])


@pytest.mark.parametrize("name", [f"{hook}_{dtype}" for dtype in ("bfloat16", "float16")
                                  for hook in ("powersgd", "topk", "int8")])
def test_half_precision_gradients(ranks, name):
    first, last = ranks[0]["half"][name]["losses"]
    params = ranks[0]["half"][name]["params"]
    assert torch.isfinite(params).all() and torch.equal(params, ranks[1]["half"][name]["params"])
    assert last < first, (name, first, last)  # it trains (30 steps of half-precision SGD move little)


@pytest.mark.parametrize("key, rank, words", [
    ("register_other_group", 0, "DDP model communicates over ranks [0, 1]"),
    ("build_not_member", 1, "not a member"),
    ("load_other_group", 0, "saved for process group ranks [0]"),
    ("load_other_config", 1, "saved with"),
    ("float64", 0, "torch.float64 not supported"),
    ("wrong_state", 1, "topk_hook needs a TopKState"),
])
def test_errors_in_processes(ranks, key, rank, words):
    assert words in ranks[rank]["errors"][key]


@pytest.mark.parametrize("make, words", [
    (lambda: TopKState(None, ratio=0.0), "ratio must be in (0, 1]"),
    (lambda: TopKState(None, ratio=1.5), "ratio must be in (0, 1]"),
    (lambda: TopKState(None, ratio=math.nan), "ratio must be in (0, 1]"),
    (lambda: PowerSGDState(None, rank=0), "rank must be an int >= 1"),
    (lambda: PowerSGDState(None, start_iter=1), "start_iter must be >= 2"),
    (lambda: QuantState(None, fmt="int4"), "unknown format"),
    (lambda: QuantState(None, block_size=0), "block_size must be an int >= 1"),
    (lambda: PowerSGDState(None, min_compression_rate=math.inf), "min_compression_rate must be finite and > 0"),
    (lambda: PowerSGDState(None, min_compression_rate=math.nan), "min_compression_rate must be finite and > 0"),
    (lambda: PowerSGDState(None, seed=-1), "seed must be an int in [0, 2^32)"),
    (lambda: PowerSGDState(None, seed=1.5), "seed must be an int in [0, 2^32)"),
])
def test_bad_arguments(make, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


@pytest.mark.parametrize("make, words", [
    (lambda: TopKState(None, ratio=True), "TopKState: ratio must be a float in (0, 1], got bool True"),
    (lambda: PowerSGDState(None, min_compression_rate=True), "min_compression_rate must be a number"),
])
def test_bad_argument_types(make, words):
    with pytest.raises(TypeError, match=re.escape(words)):
        make()


def test_needs_initialized_process_group():
    assert not torch.distributed.is_initialized(), "tests must not leave a default process group in the pytest process"
    with pytest.raises(RuntimeError, match="not initialized"):
        TopKState(None)


def test_hook_names():
    assert HOOK_NAMES == ("allreduce", "powersgd", "topk", "int8")
    with pytest.raises(ValueError, match="unknown comm_hook 'gzip'; expected one of allreduce, powersgd, topk, int8"):
        make_hook("gzip")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def deficient(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp_deficient"), "rank_deficient")


def test_powersgd_exact_for_rank_deficient_gradients(deficient):
    """2 ranks x batch 1 at rank 4: gradients of rank <= 2, which PowerSGD reproduces to rounding (torch's hook
    does, with QR); one-pass Gram-Schmidt was 0.14-0.79 off."""
    for r in deficient:
        got = r["rank_deficient"]
        for step in range(2, len(got["allreduce"])):  # start_iter=2: compressed from step 2
            plain, ours, theirs = got["allreduce"][step], got["pytrain"][step], got["torch"][step]
            assert _relative(theirs, plain) <= 1e-5, f"step {step}: torch's hook itself is off"
            assert _relative(ours, plain) <= 1e-5, f"step {step}: relative error {_relative(ours, plain):.2e}"
            assert _relative(ours, theirs) <= 1e-5, f"step {step}: {_relative(ours, theirs):.2e} from torch's hook"


RESUMED = ["powersgd", "powersgd_one_bucket", "topk", "topk_small_buckets", "int8"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Uninterrupted runs (one launch, saving at step RESUME_AT) and their resumptions in fresh processes."""
    tmp = tmp_path_factory.mktemp("ddp_resume")
    saved = launch(tmp, "resume_save")
    return saved, launch(tmp, "resume_load")


@pytest.mark.parametrize("how", ["load_state_dict", "unpickled"])
@pytest.mark.parametrize("name", RESUMED)
def test_resume_in_fresh_processes_is_bitwise(resumed, name, how):
    """A plain load_state_dict (no priming backward) or the unpickled state object, on a new
    process group and DDP, gives the uninterrupted run's gradients at every step, bit for bit."""
    saved, loaded = resumed
    for rank in range(2):
        want, got = saved[rank]["resume_save"][name], loaded[rank]["resume_load"][name][how]
        for step, (a, b) in enumerate(zip(want["grads"], got["grads"])):
            assert torch.equal(a, b), f"rank {rank}, step {step} after resuming: max |diff| {float((a - b).abs().max()):.2e}"
        assert torch.equal(want["params"], got["params"]) and want["iter"] == got["iter"]


def test_resume_into_another_model_is_a_clear_error(resumed):
    for rank in range(2):
        assert "parameter 0 has shape (64, 32), the state was saved with (128, 32)" in \
            resumed[1][rank]["resume_load"]["wrong_model"]


class _Recording(HookState):
    """A state whose compress has three stages (two collectives' yields) and records (bucket, stage) as they run;
    it raises in ``fail``'s stage."""

    start_iter = 0

    def __init__(self, fail=None):
        super().__init__(None)
        self.events, self.fail = [], fail

    def compress(self, bucket, x):
        for stage in range(3):
            self.events.append((bucket.index(), stage))
            if (bucket.index(), stage) == self.fail:
                raise RuntimeError("stage failed")
            if stage < 2:
                yield


class _Bucket:
    def __init__(self, index, last):
        self._index, self._last = index, last
        self._param = torch.zeros(index + 1)

    def index(self):
        return self._index

    def is_last(self):
        return self._last

    def parameters(self):
        return [self._param]

    def buffer(self):
        return self._param

    def gradients(self):
        return [self._param]


@pytest.fixture
def one_rank(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_pipelined_schedule(one_rank):
    """Each new bucket starts, then every older one moves on one stage, in the order their awaited collectives
    were issued; the last drains in that order; a bucket's future completes after its last stage, and the
    backward's end has counted ``iter``."""
    state = _Recording()
    buckets = [_Bucket(i, i == 3) for i in range(4)]
    futures = [torch.futures.Future() for _ in buckets]
    done_after = []
    for bucket, fut in zip(buckets, futures):
        state.step(bucket, fut)
        done_after.append([f.done() for f in futures])
    # issues: (0,0)->1, (1,0)->2, (0,1)->3, (2,0)->4, (1,1)->5, (3,0)->6, (2,1)->7, (3,1)->8
    assert state.events == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2),
                            (3, 0), (2, 1), (1, 2), (3, 1), (2, 2), (3, 2)]
    assert done_after == [[False] * 4, [False] * 4, [True, False, False, False], [True] * 4]
    assert state.iter == 1 and all(f.value() is b.buffer() for f, b in zip(futures, buckets))


def test_pipelined_failure_fails_every_future(one_rank):
    """A stage that raises fails the job, the buckets in flight and those completed earlier in the same job."""
    state = _Recording(fail=(3, 1))  # in the last bucket's drain, after bucket 1 has completed in that job
    buckets = [_Bucket(i, i == 3) for i in range(4)]
    futures = [torch.futures.Future() for _ in buckets]
    for bucket, fut in zip(buckets[:3], futures):
        state.step(bucket, fut)
    with pytest.raises(RuntimeError, match="stage failed"):
        state.step(buckets[3], futures[3])
    assert futures[0].value() is buckets[0].buffer()  # completed in an earlier job
    for fut in futures[1:3]:
        with pytest.raises(RuntimeError, match="stage failed"):
            fut.wait()
    assert not state._flight and state.iter == 0


def test_worker_keeps_no_job_alive(one_rank):
    """Once its futures are done, the ordered worker holds nothing of a backward: not the hook state (and so not
    its process group, which must be destroyed while the interpreter is whole, not at its shutdown), nor the
    buckets."""
    state = _Recording()
    buckets = [_Bucket(i, i == 3) for i in range(4)]
    futures = [_ORDERED.submit(lambda fut, s=state, b=b: s.step(b, fut)) for b in buckets]
    torch.futures.wait_all(futures)
    refs = [weakref.ref(state)] + [weakref.ref(b) for b in buckets]
    del state, buckets, futures
    # the last future completes inside its job, so the worker lets the job go just after: wait for that, bounded
    deadline = time.monotonic() + 10
    gc.collect()
    while any(r() is not None for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


_EXIT_SCRIPT = """
import pathlib, sys, time
from pytrain.comm.hooks._common import _ORDERED

def job(fut):
    fut.set_result(None)  # the main thread goes on to exit while this job still runs
    time.sleep(float(sys.argv[2]))
    pathlib.Path(sys.argv[1]).write_text("done")

_ORDERED.submit(job).wait()
"""


@pytest.mark.parametrize("job_s, finishes", [(0.5, True), (60.0, False)])
def test_exit_waits_for_the_worker_bounded(tmp_path, job_s, finishes):
    """The interpreter's exit waits for the worker to let its last job go (a daemon thread inside torch's C++ code
    at shutdown aborts the process), and waits at most EXIT_WAIT_S for a job that does not end."""
    script, marker = tmp_path / "exit.py", tmp_path / "marker"
    script.write_text(_EXIT_SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(marker), str(job_s)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() == finishes
    assert time.monotonic() - start < _ORDERED.EXIT_WAIT_S + 30  # interpreter start-up and torch import included
