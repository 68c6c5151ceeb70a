"""DDP step time with pytrain's comm hooks on 2 gloo processes, against plain all-reduce and torch's powerSGD_hook.

    python -m pytest bench/bench_hooks.py        # rows in the one bench table (bench/harness/)
    python bench/bench_hooks.py                  # the same measurements, printed as their own table

Model: an MLP 1024 -> 2048 -> (5 x 2048 x 2048) -> 1024, 25.2M fp32 params (100.7 MB of gradients), batch 16
per rank, MSE on fixed random data, SGD; each rank one torch thread (2 ranks on the 2-core machine).  One step =
zero_grad, forward, backward (DDP communicates), optimizer step; median of STEPS timed steps after warm-up (which
covers PowerSGD's plain start iterations), barrier-aligned.  Bytes on the wire per step: the hook's CommStats
(byte model in pytrain/comm/hooks/_common.py; plain DDP sends what allreduce_hook counts).

Cases (the "torch" column is the baseline each names; a no-communication run gives the step's floor):
  powersgd r4 vs plain       pytrain PowerSGD rank 4, DDP's default 25 MB buckets; torch = DDP's own all-reduce
  powersgd r4, 1 bucket      the same with bucket_cap_mb=200; torch = torch's powerSGD_hook (rank 4, batched),
                             which deadlocks on gloo with several buckets in flight, so compared where it runs
  topk 1% vs plain           pytrain top-k 1% (approximate selection), default buckets
  int8 vs plain              pytrain quantized all-reduce, int8, block 256, default buckets
Targets (issue 4): PowerSGD <= 0.6x plain and <= 1.0x torch's hook; top-k and int8 reported the same way.
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from harness import Row  # bench/harness/ (on sys.path through bench/conftest.py, or as this script's folder)
from harness.ddp_mlp import mlp, no_communication_hook, timed_step

WARMUP, STEPS = 5, 10
WIDTH, DEPTH, BATCH = 2048, 5, 16
ONE_BUCKET_MB = 200
LAUNCH_TIMEOUT_S = 600


def model() -> torch.nn.Module:
    return mlp(WIDTH, DEPTH)


def states():
    """case -> (bucket_cap_mb or None for DDP's default, factory of (state, hook) or None for DDP's own)."""
    from pytrain.comm import (AllReduceState, PowerSGDState, QuantState, TopKState, allreduce_hook, powersgd_hook,
                              quantized_allreduce_hook, topk_hook)
    return {
        "plain": (None, None),
        "no_communication": (None, lambda: (None, no_communication_hook)),
        "allreduce_hook": (None, lambda: (AllReduceState(None), allreduce_hook)),
        "powersgd": (None, lambda: (PowerSGDState(None, rank=4, start_iter=2), powersgd_hook)),
        "powersgd_1bucket": (ONE_BUCKET_MB, lambda: (PowerSGDState(None, rank=4, start_iter=2), powersgd_hook)),
        "torch_powersgd_1bucket": (ONE_BUCKET_MB, lambda: (torch_psgd.PowerSGDState(
            None, matrix_approximation_rank=4, start_powerSGD_iter=2, batch_tensors_with_same_shape=True),
            torch_psgd.powerSGD_hook)),
        "topk": (None, lambda: (TopKState(None, ratio=0.01), topk_hook)),
        "int8": (None, lambda: (QuantState(None, fmt="int8", block_size=256), quantized_allreduce_hook)),
    }


def time_case(bucket_mb, make) -> dict:
    kwargs = {} if bucket_mb is None else {"bucket_cap_mb": bucket_mb}
    ddp = DDP(model(), **kwargs)
    state = None
    if make is not None:
        state, hook = make()
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(BATCH, 1024, generator=gen), torch.randn(BATCH, 1024, generator=gen)
    times = []
    for step in range(WARMUP + STEPS):
        if step == WARMUP and hasattr(state, "stats"):
            sent0 = state.stats.bytes_sent
        times.append(timed_step(ddp, opt, x, y))
    out = {"median_s": statistics.median(times[WARMUP:]), "min_s": min(times[WARMUP:]), "max_s": max(times[WARMUP:])}
    if hasattr(state, "stats"):
        out["wire_bytes_per_step"] = (state.stats.bytes_sent - sent0) / STEPS
    return out


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {name: time_case(*case) for name, case in states().items()}
    results["plain"]["wire_bytes_per_step"] = results["allreduce_hook"]["wire_bytes_per_step"]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run() -> dict:
    """Launch the 2 ranks; rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(Path(tmp) / "store"), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        logs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("bench_hooks worker failed:\n" + "\n".join(log[-3000:] for log in logs))
        return json.loads(out.read_text())


#: table case -> (pytrain measurement, baseline measurement, what the baseline runs, target)
CASES = {
    "ddp powersgd r4 vs plain (25 MB buckets)": ("powersgd", "plain", "DDP default all-reduce", "<= 0.6x"),
    "ddp powersgd r4 vs torch hook (1 bucket)": ("powersgd_1bucket", "torch_powersgd_1bucket",
                                                 "torch powerSGD_hook rank 4", "<= 1.0x"),
    "ddp top-k 1% vs plain (25 MB buckets)": ("topk", "plain", "DDP default all-reduce", "reported"),
    "ddp int8 vs plain (25 MB buckets)": ("int8", "plain", "DDP default all-reduce", "reported"),
}


def wire(m: dict) -> str:
    return f"{m['wire_bytes_per_step'] / 1e6:.3g} MB/step on the wire" if "wire_bytes_per_step" in m else "-"


def floor_line(results: dict) -> str:
    return (f"step floor without communication: {results['no_communication']['median_s'] * 1e3:.1f} ms "
            f"(plain DDP {results['plain']['median_s'] * 1e3:.1f} ms)")


def table(results: dict) -> str:
    lines = ["| case | baseline ms | pytrain ms | ratio | pytrain wire | baseline wire | target |",
             "|---|---|---|---|---|---|---|"]
    for case, (ours, base, runs, target) in CASES.items():
        o, b = results[ours], results[base]
        lines.append(f"| {case} | {b['median_s'] * 1e3:.1f} ({runs}) | {o['median_s'] * 1e3:.1f} | "
                     f"{o['median_s'] / b['median_s']:.2f}x | {wire(o)} | {wire(b)} | {target} |")
    return "\n".join(lines + ["", floor_line(results)])


def test_ddp_hooks(results):
    """Rows for the one bench table (bench/harness/tables.py): step times; wire bytes in the notes."""
    measured = run()
    for case, (ours, base, runs, target) in CASES.items():
        for provider, key, name in (("pytrain", ours, f"pytrain {ours} hook, {wire(measured[ours])}"),
                                    ("torch", base, f"{runs}, {wire(measured[base])}, {floor_line(measured)}")):
            m = measured[key]
            results.rows.append(Row("hooks", case, provider, name, m["median_s"], m["min_s"], m["max_s"], STEPS,
                                    m.get("wire_bytes_per_step", 0.0), 0.0, None, target, "wire"))


if __name__ == "__main__":
    if len(sys.argv) == 4:
        worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    else:
        print(table(run()))
