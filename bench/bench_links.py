"""DDP step time of each comm hook on emulated slow links (2 ranks in network namespaces, tbf-limited veth).

    python bench/bench_links.py                               # loopback, 10gbit, 1gbit, 0.5gbit; 25M params
    python bench/bench_links.py --rates 1gbit --model 100m    # one rate, the ~100M model
    python bench/bench_links.py --out bench/results/links.json

Needs root, ip and tc (``pytrain.trainers.emulated_link``; the loopback row runs anywhere).  Per rate, one job of
2 ranks (one torch thread each): every case below gets its own DDP model (same seed, same data), and the cases'
steps are interleaved (WARMUP rounds, then ``--rounds`` rounds of one step per case), so a change of the shared
machine's load hits every case alike; the step time is each case's median.  Then the link itself is calibrated
(``pytrain.cost.calibrate``: all-reduce of 1, 8 and 32 MiB, alpha, beta and the ranks' CPU seconds per byte
sent), for the cost model.

Model: bench_hooks' MLP (1024 -> 2048 -> 5 x 2048 x 2048 -> 1024, 25.2M params; "100m": width 4096, 92.3M),
batch 16 per rank, MSE, SGD, DDP's default 25 MB buckets.  Cases: plain (DDP's own all-reduce), powersgd rank
1/4/8, top-k 0.1% / 1%, int8 and fp8 (e4m3) quantized all-reduce, and "none" (no communication: the floor of
the step, compute alone).  Wire bytes per step: each hook's CommStats (plain: the ring all-reduce's bytes).

The output JSON (one record per rate) feeds ``bench/plot_links.py`` (table, plot and the cost model's check).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pytrain.cost.calibrate import calibrate
from pytrain.cost.collectives import bytes_sent
from pytrain.trainers import spawn_on_link

from harness.ddp_mlp import mlp, no_communication_hook, timed_step  # bench/harness/ (this script's folder is on sys.path)

WARMUP, ROUNDS = 3, 5
BATCH = 16
MODELS = {"25m": (2048, 5), "100m": (4096, 5)}  # name -> (width, depth) of the MLP
CAL_SIZES = (2**20, 8 * 2**20, 32 * 2**20)  # bandwidth-dominated, around the 25 MB buckets
RATES = ("loopback", "10gbit", "1gbit", "0.5gbit")
TIMEOUT_S = 1800


def model(name: str) -> torch.nn.Module:
    return mlp(*MODELS[name])


def cases() -> Dict[str, Optional[tuple]]:
    """case -> (state, hook), or None for DDP's own all-reduce."""
    from pytrain.comm import PowerSGDState, QuantState, TopKState, powersgd_hook, quantized_allreduce_hook, topk_hook
    out: Dict[str, Optional[tuple]] = {"plain": None, "none": (None, no_communication_hook)}
    for r in (1, 4, 8):
        out[f"powersgd_r{r}"] = (PowerSGDState(None, rank=r, start_iter=2), powersgd_hook)
    for pct, ratio in (("0.1", 0.001), ("1", 0.01)):
        out[f"topk_{pct}%"] = (TopKState(None, ratio=ratio), topk_hook)
    out["int8"] = (QuantState(None, fmt="int8"), quantized_allreduce_hook)
    out["fp8"] = (QuantState(None, fmt="fp8_e4m3"), quantized_allreduce_hook)
    return out


def measure(model_name: str, only: Optional[list], rounds: int = ROUNDS) -> dict:
    """One rank's part of a rate's job; every rank returns the same dict (rank 0's times)."""
    torch.set_num_threads(1)
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(BATCH, 1024, generator=gen), torch.randn(BATCH, 1024, generator=gen)
    runs = {}
    for name, case in cases().items():
        if only and name not in only and name != "none":
            continue
        ddp = DDP(model(model_name), init_sync=False)
        state = None
        if case is not None:
            state, hook = case
            ddp.register_comm_hook(state, hook)
        runs[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3), state, [])
    n_params = sum(p.numel() for p in next(iter(runs.values()))[0].parameters())
    sent0 = {}
    for step in range(WARMUP + rounds):
        if step == WARMUP:
            sent0 = {k: r[2].stats.bytes_sent for k, r in runs.items() if hasattr(r[2], "stats")}
        for name, (ddp, opt, state, times) in runs.items():
            times.append(timed_step(ddp, opt, x, y))
    out = {"n_params": n_params, "world_size": world, "cases": {}}
    for name, (ddp, opt, state, times) in runs.items():
        timed = torch.tensor(times[WARMUP:], dtype=torch.float64)
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        wire = ((state.stats.bytes_sent - sent0[name]) / rounds if name in sent0 else
                0.0 if name == "none" else bytes_sent("all_reduce", 4.0 * n_params, world))
        out["cases"][name] = {"median_s": statistics.median(timed.tolist()), "min_s": float(timed.min()),
                              "max_s": float(timed.max()), "wire_bytes_per_step": wire}
    del runs
    if world > 1:
        cal = calibrate(sizes=CAL_SIZES, repeats=5, warmup=2)
        out["link"] = {"alpha_s": cal.link.alpha, "beta_s_per_byte": cal.link.beta,
                       "host_s_per_byte": cal.host_s_per_byte, "measured": {str(k): v for k, v in cal.measured.items()}}
    return out


def run(rates, model_name: str, nproc: int = 2, only: Optional[list] = None, rounds: int = ROUNDS) -> list:
    records = []
    for rate in rates:
        start = time.time()
        result = spawn_on_link(measure, nproc, None if rate == "loopback" else rate, model_name, only, rounds,
                               timeout_s=TIMEOUT_S)[0]
        result.update(rate=rate, model=model_name, wall_s=time.time() - start)
        records.append(result)
        print(f"{rate}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.0f} ms" for k, v in result["cases"].items()),
              file=sys.stderr, flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default=",".join(RATES), help="comma-separated: loopback and/or tc rates")
    parser.add_argument("--model", default="25m", choices=sorted(MODELS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timed rounds (one step per case each)")
    parser.add_argument("--out", default=None, help="append the records to this JSON file (a list)")
    args = parser.parse_args(argv)
    records = run([r.strip() for r in args.rates.split(",") if r.strip()], args.model, args.nproc,
                  [c for c in args.cases.split(",") if c] or None, args.rounds)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else []
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        path.write_text(json.dumps(old + [dict(r, date=stamp) for r in records], indent=1))
    print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
