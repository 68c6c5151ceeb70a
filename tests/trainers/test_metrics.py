"""The trainers' output pieces: the tqdm progress bar (elapsed, ETA and rate on a terminal, nothing otherwise, a
resumed run's rate from its own steps) and ``TrainSummary`` (a readable record that reads like the old dict, the
measurements a run lacks absent)."""
import io
import json
import re

from pytrain.trainers import ProgressBar, TrainSummary


class Terminal(io.StringIO):
    """A text stream that says it is a terminal (what the bar draws on)."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_elapsed_eta_and_rate():
    stream = Terminal()
    bar = ProgressBar(10, stream=stream, initial=4)
    for done in range(5, 8):
        bar.update(done, f"loss {done / 10:.2f}")
    bar.close()
    last = stream.getvalue().split("\r")[-1]
    # e.g. " 70%|#######   | 7/10 [00:00<00:00, 1234.5step/s, loss 0.70]"
    assert re.search(r"7/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step), loss 0\.70\]", last), last


def test_progress_bar_draws_nothing_off_a_terminal_or_when_disabled():
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        bar = ProgressBar(10, enabled=enabled, stream=stream)
        bar.update(3, "loss 1.00")
        bar.close()
        assert stream.getvalue() == ""


def test_summary_reads_like_the_dict_and_omits_what_the_run_lacks():
    fresh = TrainSummary(steps=0, start_step=0, steps_run=0, epochs=0.0, world_size=2, stopped_early=False)
    assert dict(fresh) == {"steps": 0, "start_step": 0, "steps_run": 0, "epochs": 0.0, "world_size": 2,
                           "stopped_early": False}
    assert "first_loss" not in fresh and fresh.get("best_val_loss") is None
    assert repr(fresh) == "TrainSummary(0 steps (no step) on 2 ranks)"
    resumed = TrainSummary(steps=10, start_step=6, steps_run=4, epochs=1.25, world_size=2, stopped_early=False,
                           first_loss=3.25, final_loss=2.5, median_step_s=0.0125, median_opt_s=0.001,
                           tokens_per_s=12345.0, bytes_sent=1_000_000, bytes_uncompressed=4_000_000)
    assert resumed["steps_run"] == 4 and resumed.final_loss == 2.5 and "best_val_loss" not in resumed
    assert json.loads(json.dumps(dict(resumed)))["bytes_sent"] == 1_000_000
    assert repr(resumed) == ("TrainSummary(4 steps (steps 7-10, resumed from step 6) on 2 ranks, loss 3.25 -> 2.5, "
                             "12,345 tokens/s, step 12.5 ms, 1 MB sent of 4 MB)")
