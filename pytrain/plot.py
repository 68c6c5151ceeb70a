"""``pytrain plot RUN... | --bench RESULTS``: PNG plots of runs, benchmark tables and tune studies (matplotlib).

A RUN is a TensorBoard directory (``pytrain train --tensorboard DIR``) or a JSON-lines log (``--log-file``),
read by ``pytrain.trainers.tracking.read_run``.  From runs: ``loss.png`` (training loss, one line per run, and
validation loss, one line with markers per run that has one), ``lr.png`` (the learning-rate schedule, one line per
run), ``step_time.png`` (measured step time per run, and the cost model's prediction as a dashed level line
where the run has one).  ``--bench RESULTS`` (a ``bench/results/*.md`` file): ``bench.png``, two panels of bars,
one bar per case and table: the time ratio pytrain / PyTorch (below 1: pytrain is faster) and the fraction of
the machine's measured ceiling.  ``pytrain tune`` draws ``history.png`` and ``importances.png`` through
``tune_figures`` (Optuna's matplotlib visualisation).

Each ``*_figure`` function returns the matplotlib ``Figure`` (the tests count its lines and bars);
``save_figure`` writes it.  Needs matplotlib (``pip install pytrain[plot]``).
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .trainers.tracking import Series, missing, read_run

Run = Tuple[str, Series]
SIZE = (8, 4.5)  # inches; at DPI: 800 x 450 pixels
DPI = 100


def _figure(rows: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise missing("matplotlib", "plot", "plotting") from exc
    fig = Figure(figsize=(SIZE[0], SIZE[1] * rows), dpi=DPI, layout="constrained")
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def load_runs(paths: List[str]) -> List[Run]:
    """(label, scalars) per run path; labels are the paths' names, made unique with their parents."""
    runs = [(Path(p), read_run(p)) for p in paths]
    labels = [p.stem if p.is_file() else p.name for p, _ in runs]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p, _ in runs]
    return [(label, series) for label, (_, series) in zip(labels, runs)]


def _need(runs: List[Run], tag: str, what: str) -> None:
    if not any(tag in series for _, series in runs):
        raise ValueError(f"no run has {what} ({tag}); runs: {', '.join(label for label, _ in runs)}")


def _runs_figure(runs: List[Run], tag: str, what: str, draw, *, ylabel: str, title: str):
    """One axes over the steps: ``draw(ax, label, series)`` for every run that holds ``tag``; a ValueError naming
    ``what`` when none does."""
    _need(runs, tag, what)
    fig, (ax,) = _figure()
    for label, series in runs:
        if tag in series:
            draw(ax, label, series)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def loss_figure(runs: List[Run]):
    """Training loss per run (a line each) and validation loss (a line with markers each, where present)."""
    def draw(ax, label, series):
        line, = ax.plot(*series["train/loss"], label=f"{label} train", linewidth=1)
        if "val/loss" in series:
            ax.plot(*series["val/loss"], marker="o", color=line.get_color(), linestyle="--", label=f"{label} val")
    return _runs_figure(runs, "train/loss", "a training loss", draw, ylabel="loss", title="loss")


def lr_figure(runs: List[Run]):
    """The learning rate of every step, a line per run."""
    def draw(ax, label, series):
        ax.plot(*series["train/lr"], label=label)
    return _runs_figure(runs, "train/lr", "a learning rate", draw, ylabel="learning rate",
                        title="learning-rate schedule")


def step_time_figure(runs: List[Run]):
    """Measured step time per run (ms), and the cost model's predicted step time as a dashed level line."""
    def draw(ax, label, series):
        steps, seconds = series["perf/step_s"]
        line, = ax.plot(steps, [s * 1e3 for s in seconds], label=f"{label} measured", linewidth=1)
        if "perf/predicted_step_s" in series:
            ax.axhline(series["perf/predicted_step_s"][1][-1] * 1e3, color=line.get_color(), linestyle="--",
                       label=f"{label} predicted (cost model)")
    return _runs_figure(runs, "perf/step_s", "step times", draw, ylabel="step time (ms)",
                        title="step time: measured vs predicted")


def read_bench_tables(path) -> List[Tuple[str, Dict[str, Tuple[float, Optional[float]]]]]:
    """The benchmark tables of a results Markdown file: (heading, {case: (ratio, fraction of ceiling or None)}),
    one per table with ``case`` and ``ratio`` columns."""
    text = Path(path).read_text(encoding="utf-8")
    tables, heading, columns = [], Path(path).stem, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if columns is None:
            columns = [c.lower() for c in cells]
            if "case" in columns and any(c.startswith("ratio") for c in columns):
                tables.append((heading, {}))
            else:
                columns = ["-"]
            continue
        if columns == ["-"] or set(cells[0]) <= set("-: "):
            continue
        ratio = cells[next(i for i, c in enumerate(columns) if c.startswith("ratio"))]
        ceiling = next((cells[i] for i, c in enumerate(columns) if "ceiling" in c), "")
        match_r, match_c = re.match(r"([\d.]+)x", ratio), re.match(r"([\d.]+)%", ceiling)
        if match_r:
            tables[-1][1][cells[columns.index("case")]] = (float(match_r.group(1)),
                                                           float(match_c.group(1)) / 100 if match_c else None)
    tables = [t for t in tables if t[1]]
    if not tables:
        raise ValueError(f"{path}: no benchmark table (a Markdown table with 'case' and 'ratio' columns)")
    return tables


def bench_figure(path):
    """Two panels of horizontal bars, a bar per case and table: ratio pytrain / PyTorch, fraction of ceiling."""
    tables = read_bench_tables(path)
    cases = list(dict.fromkeys(case for _, rows in tables for case in rows))
    fig, (ratio_ax, ceiling_ax) = _figure(rows=2)
    fig.set_size_inches(SIZE[0], max(SIZE[1] * 2, 0.35 * len(cases) * len(tables) * 2 + 2))
    height = 0.8 / len(tables)
    for k, (heading, rows) in enumerate(tables):
        ys = [cases.index(c) + k * height for c in rows]
        ratio_ax.barh(ys, [r for r, _ in rows.values()], height=height, label=heading)
        with_ceiling = [(y, f) for y, (_, f) in zip(ys, rows.values()) if f is not None]
        if with_ceiling:
            ceiling_ax.barh(*zip(*with_ceiling), height=height, label=heading)
    for ax in (ratio_ax, ceiling_ax):
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7)
    ratio_ax.axvline(1.0, color="black", linewidth=0.8)
    ratio_ax.set(xlabel="time ratio pytrain / PyTorch (< 1: pytrain faster)", title=f"{Path(path).name}")
    ceiling_ax.set(xlabel="fraction of the measured ceiling (memory bandwidth or matmul rate)")
    return fig


def tune_figures(study) -> Dict[str, object]:
    """Optuna's optimisation history, and the parameter importances (PED-ANOVA) when two trials completed."""
    try:
        import matplotlib  # noqa: F401  (Optuna's plots need it)
    except ImportError as exc:
        raise missing("matplotlib", "tune", "pytrain tune's plots") from exc
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Some regimes for parameter")  # few trials: said in the docs
        out["history"] = ovm.plot_optimization_history(study).figure
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if len(complete) >= 2:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            out["importances"] = ovm.plot_param_importances(study, evaluator=evaluator).figure
    for fig in out.values():
        fig.set_size_inches(*SIZE)
        fig.set_dpi(DPI)
    return out


def save_figure(fig, path) -> Path:
    """Writes ``fig`` as a PNG at ``DPI``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    if type(fig).__module__ == "matplotlib.figure" and "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close(fig)  # figures made through pyplot stay registered there until closed
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pytrain plot", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="RUN", help="TensorBoard directories or JSON-lines logs")
    p.add_argument("--bench", metavar="RESULTS", help="a benchmark results Markdown file (bench/results/*.md)")
    p.add_argument("--out", default=".", help="directory for the PNG files (default: .)")
    args = p.parse_args(argv)
    if not args.runs and args.bench is None:
        p.error("give at least one RUN, or --bench RESULTS")
    try:
        figures = {}
        if args.runs:
            runs = load_runs(args.runs)
            figures.update(loss=loss_figure(runs), lr=lr_figure(runs))
            if any("perf/step_s" in series for _, series in runs):
                figures["step_time"] = step_time_figure(runs)
        if args.bench is not None:
            figures["bench"] = bench_figure(args.bench)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pytrain plot: error: {exc}", file=sys.stderr)
        return 1
    for name, fig in figures.items():
        print(f"plot: {save_figure(fig, Path(args.out) / f'{name}.png')}")
    return 0
