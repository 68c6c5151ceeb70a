"""Launch the ranks of a multi-process test worker and collect what each rank saved.

A worker is a script run as ``python WORKER RANK WORLD STORE_FILE OUT_FILE ARGS...`` that joins a process group
through the file store, runs its scenarios and ``torch.save``s one result per rank to OUT_FILE
(tests/comm/ddp_worker.py, tests/optim/sharded_worker.py).  The workers import the pytrain of the checkout
the worker lives in (``PYTHONPATH`` is set to it), not another installed in the environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch


def launch_ranks(worker: Path, world: int, tmp: Path, *args: str, timeout_s: float, what: str) -> List[object]:
    """Run ``world`` ranks of ``worker`` with ``args`` writing into ``tmp``; the results (index = rank).  A hang
    (past ``timeout_s``) or a failing rank fails the calling test with the ranks' output; ``what`` names the worker
    in that message."""
    outs = [tmp / f"rank{r}_of{world}.pt" for r in range(world)]
    store = tmp / f"store{world}"
    root = str(worker.resolve().parents[2])  # <checkout>/tests/<area>/worker.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(store), str(outs[r]), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} hung for {timeout_s} s")
    if any(p.returncode for p in procs):
        pytest.fail(f"{what} failed:\n" + "\n".join(log[-4000:] for log in logs))
    results = [torch.load(out, weights_only=False) for out in outs]
    for out in outs:
        out.unlink()
    store.unlink(missing_ok=True)
    return results
