"""PipelineTrainer against the unsplit model, with real processes (gloo, 2 ranks = 2 stages).

One spawn runs every schedule and the bad-input cases (processes are slow to start on 2 cores);
each test then checks its part of the ranks' results against a single-process reference.
"""
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pytrain.cost.report import BubbleReport
from pytrain.testing.tolerances import assert_close
from pytrain.trainers.launch import spawn
from pytrain.trainers.pipeline import PipelineTrainer
from pytrain.trainers.pipeline_balance import layer_times, partition
from pytrain.trainers.tracking import TAGS, read_run

BATCH, N_MICRO, STEPS, LR = 8, 4, 3, 1e-2
#: case -> split points of the 8-layer model (None: balanced by measured layer time; "stages": cut by hand)
CASES = {"gpipe": [4], "1f1b": [3], "interleaved": [2, 4, 6], "balanced": None, "stages": [5]}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 5))


def _batches(n: int = STEPS, batch: int = BATCH):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 12, generator=g), torch.randn(batch, 5, generator=g)) for _ in range(n)]


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


def _trainer(model, schedule, **kwargs):
    kwargs.setdefault("n_microbatches", N_MICRO)
    return PipelineTrainer(model, schedule=schedule, loss_fn=nn.functional.mse_loss, optimizer=_adamw, **kwargs)


def _error(fn):
    """The (type name, message) that ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- the test inspects whichever error came
        return type(exc).__name__, str(exc)
    return None


def _new_trainer(case):
    if case == "stages":  # already cut: parameter "<stage>.<name in the stage>", the stage keeps model names
        model = _model()
        return _trainer(None, "1f1b", stages=[model[:5], model[5:]]), lambda name: name.split(".", 1)[1]
    schedule = "gpipe" if case == "balanced" else case
    return _trainer(_model(), schedule, split_points=CASES[case]), lambda name: name


def _train(case):
    trainer, model_name = _new_trainer(case)
    result = {"losses": []}
    for i, (x, y) in enumerate(_batches()):
        result["losses"].append(trainer.step(x, y))
        if i == 0:
            result["grads"] = {model_name(n): p.grad.clone() for n, p in trainer.named_parameters()}
    result["split_points"] = trainer.split_points
    result["params"] = {model_name(n): p.detach().clone() for n, p in trainer.named_parameters()}
    result["bubble"] = trainer.bubble_report()
    return result


def _bad_inputs():
    tiny = nn.Sequential(nn.Linear(4, 4))
    trainer = _trainer(_model(), "gpipe", split_points=[4])
    x, y = _batches(1)[0]
    return {
        "more_stages_than_layers": _error(lambda: _trainer(tiny, "gpipe")),
        "interleaved_too_few_layers": _error(lambda: _trainer(_model()[:3], "interleaved")),
        "1f1b_too_few_microbatches": _error(lambda: _trainer(_model(), "1f1b", n_microbatches=1)),
        "indivisible_batch": _error(lambda: trainer.step(x[:7], y[:7])),
        "first_step": trainer.step(x, y),
        "micro_batch_shape_changed": _error(lambda: trainer.step(x[:4], y[:4])),
        "bad_split_points": _error(lambda: _trainer(_model(), "gpipe", split_points=[0])),
        "loss_after_errors": trainer.step(x, y),  # the pipeline still runs: nothing was left half-done
    }


def _checkpoints(directory):
    """Train 2 steps, save, train 1 more; a fresh trainer that loads the save must take the same 3rd step."""
    (x0, y0), (x1, y1), (x2, y2) = _batches()
    trainer = _trainer(_model(), "1f1b", split_points=[4])
    trainer.step(x0, y0), trainer.step(x1, y1)
    trainer.save(directory)
    want = trainer.step(x2, y2), {n: p.detach().clone() for n, p in trainer.named_parameters()}, trainer.steps
    resumed = _trainer(_model(), "1f1b", split_points=[4])
    for p in resumed.parameters():  # other weights: everything must come from the checkpoint
        nn.init.normal_(p)
    resumed.load(directory)
    got = resumed.step(x2, y2), {n: p.detach().clone() for n, p in resumed.named_parameters()}, resumed.steps
    other_split = _trainer(_model(), "1f1b", split_points=[3])
    return {"want": want, "got": got, "mismatch": _error(lambda: other_split.load(directory)),
            "missing": _error(lambda: resumed.load(f"{directory}/nothing-here"))}


def _tracked(directory):
    """Steps logged to JSON lines and TensorBoard (global rank 0 writes both)."""
    trainer = _trainer(_model(), "gpipe", split_points=[4], log_file=f"{directory}/log.jsonl",
                       tensorboard=f"{directory}/tb")
    losses = [trainer.step(x, y) for x, y in _batches()]
    trainer.close()
    return {"losses": losses, "directory": directory}


def _pipeline_worker(directory):
    return {"cases": {case: _train(case) for case in CASES}, "bad": _bad_inputs(), "rank": dist.get_rank(),
            "checkpoint": _checkpoints(directory), "tracked": _tracked(directory)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_pipeline_worker, 2, str(tmp_path_factory.mktemp("pipeline_ckpt")))


def _reference():
    """Losses, first-step gradients and final params of the unsplit model on the same batches."""
    model = _model()
    opt = _adamw(model.parameters())
    losses, grads = [], None
    for x, y in _batches():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(loss.item())
        opt.step()
    return losses, grads, dict(model.named_parameters())


def _merged(ranks, case, key):
    merged = {}
    for r in ranks:
        part = r["cases"][case][key]
        assert not set(part) & set(merged), f"{case}: a parameter is on two ranks"
        merged.update(part)
    return merged


@pytest.mark.parametrize("case", list(CASES))
def test_same_gradients_and_updates_as_unsplit_model(ranks, case):
    losses, grads, params = _reference()
    for r in ranks:
        for got, want in zip(r["cases"][case]["losses"], losses):
            assert_close(torch.tensor(got), torch.tensor(want), msg=f"{case} loss on rank {r['rank']}")
    got_grads, got_params = _merged(ranks, case, "grads"), _merged(ranks, case, "params")
    assert set(got_grads) == set(grads) and set(got_params) == set(params)
    for name in grads:
        assert_close(got_grads[name], grads[name], msg=f"{case} grad {name}")
        assert_close(got_params[name], params[name], msg=f"{case} param {name} after {STEPS} steps")


def test_balanced_split_is_valid_and_shared(ranks):
    points = [r["cases"]["balanced"]["split_points"] for r in ranks]
    assert points[0] == points[1] and len(points[0]) == 1 and 0 < points[0][0] < len(_model())


@pytest.mark.parametrize("case, v, predicted", [("gpipe", 1, 1 / 5), ("1f1b", 1, 1 / 5), ("interleaved", 2, 1 / 9)])
def test_bubble_report(ranks, case, v, predicted):
    """(p-1)/(v m + p-1) with p = 2 ranks, m = 4; measured values are only sane, not predictable here."""
    for r in ranks:
        report = r["cases"][case]["bubble"]
        assert isinstance(report, BubbleReport) and report.schedule == case
        assert repr(report).startswith(f"BubbleReport({case}, 2 stages") and "predicted" in repr(report)
        assert (report["stages"], report["virtual_stages"], report["microbatches"]) == (2, v, N_MICRO)
        assert report["predicted"] == pytest.approx(predicted)
        assert 0.0 <= report["measured"] < 1.0 and report["imbalance"] >= 1.0
        assert report["step_s"] > 0 and report["predicted_step_s"] > 0
        assert report == ranks[0]["cases"][case]["bubble"]


@pytest.mark.parametrize("case, message", [
    ("more_stages_than_layers", "more stages than layers: 2 stages"),
    ("interleaved_too_few_layers", "more stages than layers: 4 stages"),
    ("1f1b_too_few_microbatches", "1F1B needs n_microbatches >= number of pipeline stages: 1 < 2"),
    ("indivisible_batch", "batch size 7 is not divisible by n_microbatches=4"),
    ("bad_split_points", "split points must increase strictly"),
    ("micro_batch_shape_changed", "micro-batch shapes changed from ((2, 12, torch.float32)"),
])
def test_bad_input_raises_on_every_rank_without_hanging(ranks, case, message):
    for r in ranks:
        kind, text = r["bad"][case]
        assert kind == "ValueError" and message in text, (case, kind, text)


def test_pipeline_still_trains_after_rejected_input(ranks):
    model, (x, y) = _model(), _batches(1)[0]
    opt = _adamw(model.parameters())
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for r in ranks:
        got = [r["bad"]["first_step"], r["bad"]["loss_after_errors"]]
        assert_close(torch.tensor(got), torch.tensor(losses))


def test_checkpoint_resume_takes_the_same_step(ranks):
    for r in ranks:
        (want_loss, want_params, want_steps), (got_loss, got_params, got_steps) = (r["checkpoint"]["want"],
                                                                                 r["checkpoint"]["got"])
        assert got_loss == want_loss and got_steps == want_steps == 3 and set(got_params) == set(want_params)
        for name in want_params:
            assert torch.equal(got_params[name], want_params[name]), name


def test_checkpoint_errors(ranks):
    for r in ranks:
        kind, text = r["checkpoint"]["mismatch"]
        assert kind == "CheckpointError" and "stage layout" in text and "'split_points': [3]" in text
        kind, text = r["checkpoint"]["missing"]
        assert kind == "CheckpointError" and "does not exist" in text


def test_steps_are_logged_to_json_lines_and_tensorboard(ranks):
    directory = Path(ranks[0]["tracked"]["directory"])
    losses = ranks[0]["tracked"]["losses"]
    steps = list(range(1, STEPS + 1))
    for path in (directory / "tb", directory / "log.jsonl"):
        run = read_run(path)
        assert run[TAGS["loss"]] == (steps, pytest.approx(losses, rel=1e-5)), path
        assert run[TAGS["lr"]] == (steps, pytest.approx([LR] * STEPS)), path
        assert run[TAGS["step_s"]][0] == steps and all(t > 0 for t in run[TAGS["step_s"]][1]), path
        assert all(b > 0 for b in run[TAGS["peak_mem_bytes"]][1]), path


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised process group"):
        _trainer(_model(), "gpipe")


def _best_max(costs, k):
    """Brute force: the smallest largest-group sum over every way to cut ``costs`` into k groups."""
    n = len(costs)
    return min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
               for cuts in itertools.combinations(range(1, n), k - 1))


@pytest.mark.parametrize("n, k", [(1, 1), (5, 2), (7, 3), (9, 4), (6, 6)])
def test_partition_is_optimal(n, k):
    costs = torch.rand(n, generator=torch.Generator().manual_seed(n * 10 + k)).tolist()
    points = partition(costs, k)
    bounds = [0] + points + [n]
    assert len(points) == k - 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
    assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == pytest.approx(_best_max(costs, k))


def test_partition_isolates_a_heavy_layer():
    assert partition([1, 1, 10, 1, 1], 3) == [2, 3]
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3"):
        partition([1, 1], 3)


def test_layer_times_find_the_heavy_layer_and_leave_no_trace():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 512), nn.Linear(512, 512), nn.Linear(512, 32),
                          nn.BatchNorm1d(32))
    stats = [b.clone() for b in model.buffers()]
    example, threads = torch.randn(32, 32), torch.get_num_threads()
    before = torch.get_rng_state()
    torch.set_num_threads(1)  # as in a launched rank: CPU-time clock, steady on a busy machine
    try:
        times = layer_times(list(model), example)
    finally:
        torch.set_num_threads(threads)
    assert len(times) == len(model) and all(t >= 0 for t in times)
    assert max(range(len(times)), key=times.__getitem__) == 2, times
    assert partition(times, 3) == [2, 3], times  # the heavy layer gets a stage of its own
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, saved) for b, saved in zip(model.buffers(), stats))
    assert torch.equal(torch.get_rng_state(), before)


def _dp_pp_worker():
    trainer = _trainer(_model(), "1f1b", split_points=[4], n_microbatches=2, dp_size=2)
    half = BATCH // 2
    for x, y in _batches():
        rows = slice(trainer.grid.dp_rank * half, (trainer.grid.dp_rank + 1) * half)
        trainer.step(x[rows], y[rows])
    return {n: p.detach().clone() for n, p in trainer.named_parameters()}


def test_data_parallel_pipeline_on_4_processes_matches_unsplit_model():
    """2 pipeline replicas x 2 stages, each replica on half of every batch: same params as one model."""
    parts = spawn(_dp_pp_worker, 4)
    _, _, params = _reference()
    for rank, part in enumerate(parts):
        assert set(part) == set(parts[rank % 2]), f"rank {rank} holds other layers than its stage on replica 0"
        for name, value in part.items():
            assert_close(value, params[name], msg=f"rank {rank} param {name}")
    assert set(parts[0]) | set(parts[1]) == set(params)
