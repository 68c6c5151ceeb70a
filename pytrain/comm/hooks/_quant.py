"""8-bit quantized all-reduce as a DDP communication hook: never sums in 8 bits.

Per bucket x (N elements) on W ranks, block size B, C = ceil(N / (W B)) B elements per rank's chunk (x padded
with zeros to W C):

    q = quantize(x + r)                        blockwise (pytrain.quant), one scale per B elements
    all-to-all: chunk j of q -> rank j         codes + scales in one uint8 buffer per destination
    a_j = (1/W) sum_ranks dequantize(chunk)    in float32 on rank j (reduce-scatter, summed in fp32)
    all-gather quantize(a_j)                   every rank dequantizes the same codes: identical results

This is a reduce-scatter + all-gather all-reduce with 8-bit payloads: per rank 2 (W - 1) / W (N + 4 N / B)
bytes against 2 (W - 1) / W 4 N for fp32 (3.9x less at B = 256).  gloo has no reduce-scatter of int8 codes
with an fp32 sum, hence all-to-all (gloo supports it on CPU; float8 codes travel as their uint8 bytes).

Error feedback (``error_feedback=True``, the default) makes the delivered sum exact over steps: each rank keeps
r = (x + r) - dequantize(q), and chunk j's owner also adds W (a_j - dequantize(quantize(a_j))), the error of
the second quantization (the average of the ranks' residuals is then exactly what was not delivered).
Without it each step's result carries the two rounding errors (about 2^-8 of each block's absmax for int8).
The first iteration runs a plain all-reduce (DDP rebuilds its buckets after it).  A NaN / inf gives its
block a NaN scale (see pytrain.quant), so the block's average is NaN on every rank; the residual is then zeroed.
"""

from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ...quant import FORMATS, QTensor, dequantize, quantize
from ...cost.collectives import bytes_sent
from ._common import HookState, all_gather_single, submit

SLICE = 1 << 20  # elements dequantized at a time: 4 MB of float32 temporaries, cache-sized and reused by the
# allocator (whole-bucket temporaries are fresh pages every step, which costs more than the dequantization)


class QuantState(HookState):
    """State of ``quantized_allreduce_hook``: fmt ("int8", "fp8_e4m3", "fp8_e5m2"), block_size (elements per
    float32 scale), error_feedback (see the module docstring)."""

    memory_names = ("residual",)

    def __init__(self, process_group=None, fmt: str = "int8", block_size: int = 256, error_feedback: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"QuantState: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"QuantState: block_size must be an int >= 1, got {block_size!r}")
        super().__init__(process_group)
        self.fmt = fmt
        self.block_size = block_size
        self.error_feedback = bool(error_feedback)

    def config(self) -> dict:
        return {"fmt": self.fmt, "block_size": self.block_size, "error_feedback": self.error_feedback}

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> None:
        world, n, rank, idx = self.world_size, x.numel(), dist.get_rank(self.process_group), bucket.index()
        chunk = -(-n // (world * self.block_size)) * self.block_size
        padded = self.buffer(idx, "padded", (world * chunk,), torch.float32, x.device)  # zero past n, kept so
        res = self.residual(idx, x, torch.float32) if self.error_feedback else None
        if res is not None:
            torch.add(x, res, out=padded[:n])
        else:
            padded[:n].copy_(x)
        q = quantize(padded, self.fmt, block_size=self.block_size)

        send = self.pack(q, world, self.buffer(idx, "send", (world, self.row_bytes(chunk)), torch.uint8, x.device))
        recv = self.buffer(idx, "recv", send.shape, torch.uint8, x.device)
        dist.all_to_all_single(recv, send, group=self.process_group, async_op=True).wait()
        received, mine = self.unpack(recv, chunk), self.buffer(idx, "mine", (chunk,), torch.float32, x.device)
        for src in range(world):  # slice by slice, cache-resident: mine = (1/W) sum_src dequantize(chunk of src)
            for lo, part in self.slices(received, src * chunk, (src + 1) * chunk):
                dst = mine[lo - src * chunk:][:part.numel()]
                dst.copy_(part) if src == 0 else dst.add_(part)
                if src == world - 1:
                    dst.div_(world)

        one = self.pack(quantize(mine, self.fmt, block_size=self.block_size), 1,
                        self.buffer(idx, "one", (1, self.row_bytes(chunk)), torch.uint8, x.device))
        gathered = self.buffer(idx, "gathered", (world, one.shape[1]), torch.uint8, x.device)
        all_gather_single(gathered, one, group=self.process_group, async_op=True).wait()
        final = self.unpack(gathered, chunk)
        for lo, part in self.slices(final, 0, n):
            x[lo:lo + part.numel()].copy_(part)
        if res is not None:
            self.feed_back(res, padded, q, mine, x, rank * chunk, bool(torch.isfinite(final.scales).all()))
        self.count(bytes_sent("all_to_all", send.nbytes, world) + bytes_sent("all_gather", one.nbytes * world, world),
                   bytes_sent("all_reduce", x.nbytes, world))

    def feed_back(self, res: Tensor, padded: Tensor, q: QTensor, mine: Tensor, x: Tensor, start: int,
                  finite: bool) -> None:
        """r = input - dequantize(q), plus W times the requantization error (mine - delivered) on the chunk
        this rank owns, which starts at ``start``; zeros after a non-finite result."""
        if not finite:
            res.zero_()
            return
        for lo, part in self.slices(q, 0, res.numel()):
            torch.sub(padded[lo:lo + part.numel()], part, out=res[lo:lo + part.numel()])
        own = slice(start, min(start + mine.numel(), res.numel()))
        if own.start < own.stop:
            res[own].add_(mine[:own.stop - own.start], alpha=self.world_size).sub_(x[own], alpha=self.world_size)

    def buffer(self, bucket_index: int, name: str, shape: Tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
        """A persistent work buffer of the bucket (zeros when first made): a fresh bucket-sized tensor each
        step would be page-faulted in again, which costs more than the codec passes themselves."""
        bufs = self.scratch.setdefault(bucket_index, {})
        buf = bufs.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            buf = bufs[name] = torch.zeros(shape, dtype=dtype, device=device)
        return buf

    def row_bytes(self, chunk: int) -> int:
        """Bytes of one packed chunk: its codes and its float32 scales."""
        return chunk + 4 * (chunk // self.block_size)

    def slices(self, q: QTensor, lo: int, hi: int) -> Iterator[Tuple[int, Tensor]]:
        """(start, float32 values) of q's elements lo..hi (lo a block boundary), SLICE elements at a time."""
        bs = self.block_size
        step = max(1, SLICE // bs) * bs
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            yield a, dequantize(QTensor(q.data[a:b], q.scales[a // bs:-(-b // bs)], self.fmt, bs))

    def pack(self, q: QTensor, rows: int, out: Tensor) -> Tensor:
        """(rows, codes + scale bytes of one chunk) uint8 into ``out``: row j is what goes to rank j."""
        return torch.cat([q.data.view(torch.uint8).view(rows, -1), q.scales.view(torch.uint8).view(rows, -1)], dim=1,
                         out=out)

    def unpack(self, buf: Tensor, chunk: int) -> QTensor:
        """The QTensor of the rows' chunks laid end to end (each chunk a whole number of blocks)."""
        return QTensor(buf[:, :chunk].reshape(-1), buf[:, chunk:].reshape(-1).view(torch.float32), self.fmt,
                       self.block_size)


def quantized_allreduce_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 8-bit quantized averaged all-reduce (``DDP.register_comm_hook(state, quantized_allreduce_hook)``).

    The returned future holds the bucket's buffer, averaged over the ranks up to the quantization error.
    """
    return submit("quantized_allreduce_hook", state, QuantState, bucket)
