"""Pipeline bubble: measured idle fraction of PipelineTrainer next to the cost model's prediction.

Two processes (gloo, one thread each) train an 8-layer MLP (width 512, micro-batch 64, equal
stages) with each schedule and micro-batch count.  Measured bubble = 1 - compute / wall of the
schedule per rank, averaged over ranks and over the steps after the first; it also counts the
point-to-point transfers and the schedule's own Python overhead, which the prediction
(``(p-1)/(m+p-1)`` for GPipe and 1F1B, ``(p-1)/(v*m+p-1)`` interleaved) leaves out.

    python -m pytest bench/bench_pipeline.py -s      # or: python bench/bench_pipeline.py

Prints one markdown table and writes it to bench/out/pipeline_bubble.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pytrain.trainers.launch import spawn
from pytrain.trainers.pipeline import PipelineTrainer

WIDTH, LAYERS, MICRO_BATCH, STEPS = 512, 8, 64, 5
CONFIGS = [(schedule, m) for schedule in ("gpipe", "1f1b", "interleaved") for m in (2, 4, 8)]
OUT = Path(__file__).resolve().parent / "out" / "pipeline_bubble.md"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])


def _sweep():
    reports = []
    for schedule, m in CONFIGS:
        per_stage = LAYERS // (4 if schedule == "interleaved" else 2)  # 2 ranks x v = 2 interleaved stages
        trainer = PipelineTrainer(_model(), schedule=schedule, n_microbatches=m,
                                  split_points=list(range(per_stage, LAYERS, per_stage)),
                                  loss_fn=nn.functional.mse_loss,
                                  optimizer=lambda params: torch.optim.SGD(params, lr=1e-3))
        x, y = torch.randn(m * MICRO_BATCH, WIDTH), torch.randn(m * MICRO_BATCH, WIDTH)
        for _ in range(STEPS):
            trainer.step(x, y)
        reports.append(trainer.bubble_report())
    return reports


def _table(reports) -> str:
    lines = [f"pipeline bubble, 2 stages (gloo, CPU, 1 thread per rank, load {os.getloadavg()[0]:.1f}), "
             f"{LAYERS} x Linear({WIDTH}) + tanh, micro-batch {MICRO_BATCH}, {STEPS - 1} timed steps",
             "", "| schedule | v | micro-batches | predicted bubble | measured bubble | per rank | imbalance | "
             "predicted step ms | measured step ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        per_rank = " / ".join(f"{b:.3f}" for b in r["per_rank"])
        lines.append(f"| {r['schedule']} | {r['virtual_stages']} | {r['microbatches']} | {r['predicted']:.3f} | "
                     f"{r['measured']:.3f} | {per_rank} | {r['imbalance']:.2f} | {r['predicted_step_s'] * 1e3:.1f} | "
                     f"{r['step_s'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def test_pipeline_bubble():
    reports = spawn(_sweep, 2)[0]
    table = _table(reports)
    print("\n" + table)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(table)
    assert all(0.0 <= r["measured"] < 1.0 for r in reports)


if __name__ == "__main__":
    test_pipeline_bubble()
