"""TensorBoard tracking and plots from one short real run of ``pytrain train`` (2 processes, so the cost model
predicts a step time and the int8 hook counts bytes): the event files read back with TensorBoard's
``EventAccumulator`` hold what the JSON-lines log holds; every plot of ``pytrain.plot`` is drawn from the run (and
from the benchmark results in bench/results), its lines or bars counted on the figure, and its PNG checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pytrain import plot
from pytrain.trainers.tracking import TAGS, read_run

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVAL_EVERY = 8, 4
BENCH = ROOT / "bench" / "results" / "2026-11-22-cpu.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    cmd = [sys.executable, "-m", "pytrain", "train", "--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16",
           "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--nproc", "2", "--batch", "16",
           "--schedule", "cyclic", "--warmup", "2", "--hook", "int8",
           "--tensorboard", str(tmp / "tb"), "--log-file", str(tmp / "log.jsonl")]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return tmp


def test_event_files_hold_the_json_lines(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags >= {TAGS[k] for k in ("loss", "val_loss", "lr", "grad_norm", "skipped", "tokens_per_s", "step_s",
                                      "predicted_step_s", "bytes_sent", "bytes_uncompressed", "peak_mem_bytes")}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "step_s", "bytes_sent", "bytes_uncompressed", "peak_mem_bytes"):
        events = acc.Scalars(TAGS[key])
        assert [e.step for e in events] == list(range(1, STEPS + 1))
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-5), key
    val = acc.Scalars(TAGS["val_loss"])
    assert [e.step for e in val] == [4, 8] and val[-1].value == pytest.approx(
        [r for r in records if "val_loss" in r][-1]["val_loss"], rel=1e-5)
    assert [e.value for e in acc.Scalars(TAGS["skipped"])] == [0] * STEPS
    bytes_sent = [e.value for e in acc.Scalars(TAGS["bytes_sent"])]
    assert bytes_sent[-1] < acc.Scalars(TAGS["bytes_uncompressed"])[-1].value  # int8 sends a quarter
    predicted = acc.Scalars(TAGS["predicted_step_s"])
    assert len(predicted) == 1 and predicted[0].step == STEPS and predicted[0].value > 0
    assert all(e.value > 0 for e in acc.Scalars(TAGS["peak_mem_bytes"]))
    from_json = read_run(run / "log.jsonl")[TAGS["loss"]][1]  # the JSON lines round to 6 digits
    assert from_json == pytest.approx([e.value for e in acc.Scalars(TAGS["loss"])], rel=1e-5)


def lines_and_png(fig, path):
    """The figure's lines per axes, and the saved PNG's size."""
    lines = [len(ax.get_lines()) for ax in fig.axes]
    plot.save_figure(fig, path)
    with Image.open(path) as image:
        return lines, image.size


def test_run_plots(run, tmp_path):
    runs = plot.load_runs([str(run / "tb"), str(run / "log.jsonl")])  # the same run, from both records
    assert [label for label, _ in runs] == ["tb", "log"]
    assert lines_and_png(plot.loss_figure(runs), tmp_path / "loss.png") == ([4], (800, 450))  # train + val each
    assert lines_and_png(plot.lr_figure(runs), tmp_path / "lr.png") == ([2], (800, 450))
    # the JSON lines hold the prediction too (pytrain train logs it at the end): measured + predicted per run
    assert lines_and_png(plot.step_time_figure(runs), tmp_path / "step.png") == ([4], (800, 450))
    lr = runs[0][1][TAGS["lr"]][1]
    assert lr[:5] == pytest.approx([3e-4, 1.65e-3, 3e-3, 1.65e-3, 3e-4])  # cyclic: lr/10 up to lr in 2 steps


def test_bench_plot(tmp_path):
    tables = plot.read_bench_tables(BENCH)
    assert len(tables) == 2 and all(len(rows) == 10 for _, rows in tables)
    fig = plot.bench_figure(BENCH)
    ratio_ax, ceiling_ax = fig.axes
    assert len(ratio_ax.patches) == len(ceiling_ax.patches) == 20  # a bar per case and run
    assert [p.get_width() for p in ratio_ax.patches[:2]] == [1.56, 1.07]
    plot.save_figure(fig, tmp_path / "bench.png")
    with Image.open(tmp_path / "bench.png") as image:
        assert image.size[0] == 800 and image.size[1] >= 900


def test_plot_command(run, tmp_path, capsys):
    from pytrain.cli import main

    assert main(["plot", str(run / "tb"), "--bench", str(BENCH), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.png", "loss.png", "lr.png", "step_time.png"]
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "no such run" in capsys.readouterr().err
