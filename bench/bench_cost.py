"""Validation of the DDP cost model: predicted vs measured step time over model size x hook x processes.

For each configuration (2 MLP sizes x {plain all-reduce, PyTorch's fp16_compress_hook, pytrain's int8
quantized_allreduce_hook} x {1, 2} processes, gloo, one intra-op thread per process):

* measured: median step time (zero_grad, forward, backward with DDP's bucketed all-reduce, SGD step) over
  the timed steps, the slowest rank's median;
* predicted: ``ddp_step`` with the compute (forward + backward under ``no_sync``: no communication),
  optimizer, bucket-copy and codec times of each process, timed interleaved with the DDP steps (step by step, so a
  change of the machine's load hits both alike: on 2 shared cores the load moves within seconds), and the
  link from ``calibrate`` on the same group, timed on what the hook sends (fp32 or fp16 all-reduce; uint8
  all-to-all for the int8 hook, whose all-to-all + all-gather pair costs what a ring all-reduce of its
  bytes does) at sizes spanning DDP's buckets.  Two predictions: overlap (DDP's design: buckets reduced during
  the backward) and serial (on CPUs gloo's reduction runs on the cores that compute, so overlap is partial).

Target (issue 5): median |predicted / measured - 1| over the configurations <= 20%.  On a shared 2-core
machine the numbers move with the load: read them together with the load average printed above them.

Also the calibration's own accuracy (moved here from the unit tests, where it depended on the machine's load): a
link fitted on 8 KiB, 256 KiB and 2 MiB all-reduces predicts held-out sizes timed in the same interleaved rounds;
target: median |predicted / measured - 1| <= 30% (within the sizes spanned: gloo slows down beyond the last-level
cache, a knee the linear alpha-beta model does not have).

Run: ``python bench/bench_cost.py`` (or through pytest: ``python -m pytest bench/bench_cost.py -s``).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from pytrain.comm import QuantState, register_comm_hook
from pytrain.cost import all_gather, all_to_all, calibrate, ddp_step, ring_allreduce
from pytrain.quant import dequantize, quantize
from pytrain.trainers.launch import spawn

MODELS = {"mlp-2M": (1024, 2), "mlp-8M": (1024, 8)}  # name -> (width, Linear layers)
BATCH, WARMUP, STEPS = 64, 3, 12
HOOKS = ("allreduce", "fp16", "int8")
INT8_BLOCK = 256
# hook -> (dtype on the wire, collective calibrated, bytes sent / fp32 gradient bytes); int8: codes + one fp32
# scale per block, sent by all-to-all then all-gather (pytrain/comm/hooks/_quant.py)
WIRE = {"allreduce": (torch.float32, "all_reduce", 1.0), "fp16": (torch.float16, "all_reduce", 0.5),
        "int8": (torch.uint8, "all_to_all", (1 + 4 / INT8_BLOCK) / 4)}
CALIBRATION_SIZES = (2**20, 4 * 2**20, 12 * 2**20, 32 * 2**20)
PROCESSES = (1, 2)
TARGET = 0.20
FIT_SIZES, HELD_OUT_SIZES = (8 * 2**10, 256 * 2**10, 2 * 2**20), (32 * 2**10, 128 * 2**10, 512 * 2**10, 2**20)
HELD_OUT_TARGET = 0.30


def _model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    width, layers = MODELS[name]
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])


def _medians(fns: Dict[str, Callable[[], object]], steps: int = STEPS, warmup: int = WARMUP) -> Dict[str, float]:
    """Median seconds of each function, the functions interleaved step by step (load drifts hit all alike)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _slowest(values: Dict[str, float]) -> Dict[str, float]:
    """The maximum over ranks of each value (every rank gets it)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def _batch(width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(dist.get_rank())
    return torch.randn(BATCH, width, generator=g), torch.randn(BATCH, width, generator=g)


def _case(name: str, hook: str) -> Dict[str, float]:
    """Seconds of: a DDP step, the same step's compute without communication (``no_sync``), the SGD step,
    the gradient copies into and out of a bucket, and the hook's codec work on the whole gradient, interleaved."""
    model = DDP(_model(name), bucket_cap_mb=25)
    if hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    if hook == "int8":
        register_comm_hook(model, QuantState(block_size=INT8_BLOCK))
    opt, (x, y) = torch.optim.SGD(model.parameters(), lr=1e-3), _batch(MODELS[name][0])
    grads = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    bucket = torch.empty_like(grads)

    def fwd_bwd():
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()

    def compute():
        with model.no_sync():
            fwd_bwd()

    def step():
        fwd_bwd()
        opt.step()
    fns = {"step_s": step, "compute_s": compute, "optimizer_s": opt.step,
           "copy_s": lambda: grads.copy_(bucket.copy_(grads))}
    if hook == "fp16":
        fns["codec_s"] = lambda: grads.copy_(grads.half().div_(dist.get_world_size()))
    if hook == "int8":  # quantize + dequantize twice: the bucket, then the reduced chunk (approximately)
        fns["codec_s"] = lambda: [grads.copy_(dequantize(quantize(grads, "int8", block_size=INT8_BLOCK)))
                                  for _ in range(2)]
    return {"n_params": grads.numel(), **_slowest(_medians(fns))}


def _ddp_worker(hooks: Tuple[str, ...]) -> Dict[str, object]:
    """Every rank: the timings of each (model, hook); on 2+ ranks also the link per wire dtype."""
    torch.set_num_threads(1)
    links, held_out = {}, {}
    if dist.get_world_size() > 1:
        for dtype, op in sorted({WIRE[h][:2] for h in hooks}, key=str):
            links[str(dtype)] = calibrate(sizes=CALIBRATION_SIZES, repeats=8, warmup=2, dtype=dtype, op=op).link
        held_out = calibrate(sizes=FIT_SIZES, repeats=100, validate_sizes=HELD_OUT_SIZES).relative_errors(held_out=True)
    return {"links": links, "held_out": held_out,
            "cases": {(name, hook): _case(name, hook) for name in MODELS for hook in hooks}}


def _int8_allreduce(n_bytes: float, p: int, link) -> float:
    """The int8 hook's collectives on ``n_bytes`` of codes + scales: all-to-all, then all-gather."""
    return all_to_all(n_bytes, p, link) + all_gather(n_bytes, p, link)


def run() -> Tuple[List[Dict[str, object]], Dict[str, object], Dict[int, float]]:
    """Measure and predict every configuration: (rows of the table, links, held-out calibration errors by size)."""
    measured = {p: spawn(_ddp_worker, p, HOOKS)[0] for p in PROCESSES}
    links, held_out = measured[max(PROCESSES)]["links"], measured[max(PROCESSES)]["held_out"]
    rows = []
    for p in PROCESSES:
        for (name, hook), c in measured[p]["cases"].items():
            dtype, _, ratio = WIRE[hook]
            est = {overlap: ddp_step(c["n_params"], compute_s=c["compute_s"], optimizer_s=c["optimizer_s"],
                                     copy_s=c["copy_s"], world_size=p, link=links[str(dtype)],
                                     compression_ratio=ratio, codec_s=c.get("codec_s", 0.0), overlap=overlap,
                                     allreduce=_int8_allreduce if hook == "int8" else ring_allreduce)
                   for overlap in (True, False)}
            rows.append({"config": f"{name} {hook} p={p}", "measured_s": c["step_s"], "compute_s": c["compute_s"],
                         "comm_s": est[True].comm_s, "predicted_s": est[True].step_s, "serial_s": est[False].step_s,
                         "error": est[True].step_s / c["step_s"] - 1,
                         "serial_error": est[False].step_s / c["step_s"] - 1})
    return rows, links, held_out


def table(rows, links, held_out) -> str:
    lines = [f"load average {os.getloadavg()[0]:.2f} (2-core machine; numbers are noisy when others run)",
             "links: " + ", ".join(f"{k}: alpha {v.alpha * 1e6:.0f} us, {v.bandwidth / 1e9:.2f} GB/s"
                                   for k, v in links.items()),
             "", "| config | measured ms | compute ms | comm ms | predicted ms (overlap) | error "
                 "| predicted ms (serial) | error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['measured_s'] * 1e3:.1f} | {r['compute_s'] * 1e3:.1f} | {r['comm_s'] * 1e3:.1f} | "
              f"{r['predicted_s'] * 1e3:.1f} | {r['error']:+.1%} | {r['serial_s'] * 1e3:.1f} | "
              f"{r['serial_error']:+.1%} |"
              for r in rows]
    for key, label in (("error", "overlap"), ("serial_error", "serial")):
        median = statistics.median(abs(r[key]) for r in rows)
        lines.append(f"median |error| ({label}) over {len(rows)} configurations: {median:.1%} (target <= {TARGET:.0%})")
    median = statistics.median(abs(e) for e in held_out.values())
    lines.append(f"calibration on {', '.join(f'{n // 1024} KiB' for n in FIT_SIZES)}, held-out sizes: "
                 + ", ".join(f"{n // 1024} KiB {e:+.0%}" for n, e in sorted(held_out.items()))
                 + f"; median |error| {median:.0%} (target <= {HELD_OUT_TARGET:.0%}: "
                 + ("met)" if median <= HELD_OUT_TARGET else "MISSED)"))
    return "\n".join(lines)


def test_ddp_cost_model(capsys):
    rows, links, held_out = run()
    with capsys.disabled():
        print("\n" + table(rows, links, held_out))
    assert len(rows) >= 6 and sorted(held_out) == sorted(HELD_OUT_SIZES)


if __name__ == "__main__":
    print(table(*run()))
