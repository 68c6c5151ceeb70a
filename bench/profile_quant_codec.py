"""Codec time of the quantized all-reduce hook (``QuantState.compress``) in one process, without a network.

Rank 0 of W = 2 ranks is emulated: the all-to-all and the all-gather are replaced by copies (every rank is
taken to send what this one sends).  The emulated collectives' copies and the refill of the buckets are timed
apart and taken off, so the codec time is what remains: quantization, packing, the fp32 mean of the received
chunks, requantization, the final dequantization and the error feedback.  The buckets
are DDP's for a 25.2M-parameter fp32 model with the default 25 MB bucket cap; one thread, as each DDP rank
uses.  Prints the median codec time of one step (all buckets) and torch.profiler's table of the ops inside it (the
emulation's copies appear under "emulated collectives" and "bucket refill").

    python bench/profile_quant_codec.py [--fmt int8] [--steps 5] [--threads 1] [--no-profile]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pytrain.comm import QuantState
from pytrain.comm.hooks import _quant

BUCKETS = [6_553_600] * 3 + [5_539_200]  # 25 MiB of fp32 each, the rest in the last: 25.2M elements
WORLD = 2


OUTSIDE = [0.0]  # seconds spent in the emulated collectives and the bucket refills


class _Done:
    def wait(self):
        return None


class _Outside(torch.profiler.record_function):
    """A timed, profiler-labelled section that is not codec work."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc):
        OUTSIDE[0] += time.perf_counter() - self.t0
        return super().__exit__(*exc)


def _all_to_all(recv, send, group=None, async_op=False):
    with _Outside("emulated collectives"):
        recv.copy_(send)
    return _Done()


def _all_gather(out, inp, group=None, async_op=False):
    with _Outside("emulated collectives"):
        out.copy_(inp.reshape(1, -1).expand_as(out))
    return _Done()


class _Bucket:
    def __init__(self, index):
        self._index = index

    def index(self):
        return self._index


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", default="int8")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=0, world_size=1)
        try:
            dist.all_to_all_single, _quant.all_gather_single = _all_to_all, _all_gather
            state = QuantState(fmt=args.fmt)
            state.world_size = WORLD
            gen = torch.Generator().manual_seed(0)
            grads = [torch.randn(n, generator=gen) * 1e-3 for n in BUCKETS]
            bufs = [g.clone() for g in grads]

            def step():
                for i, (g, b) in enumerate(zip(grads, bufs)):
                    with _Outside("bucket refill"):
                        b.copy_(g)  # the bucket as backward leaves it
                    for _ in state.compress(_Bucket(i), b):  # a generator: one stage per collective
                        pass

            step()
            step()
            times = []
            for _ in range(args.steps):
                OUTSIDE[0] = 0.0
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0 - OUTSIDE[0])
            print(f"fmt {args.fmt}, W {WORLD}, {sum(BUCKETS) / 1e6:.1f}M fp32 in {len(BUCKETS)} buckets, "
                  f"{args.threads} thread(s): codec {statistics.median(times) * 1e3:.1f} ms per step, median of "
                  f"{args.steps} (min {min(times) * 1e3:.1f})")
            if not args.no_profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    step()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
