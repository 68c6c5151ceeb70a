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

Codec (pytrain/ops/quantize.py), one pass over memory each: ``quantize_into`` quantizes x + r per rank's chunk
straight into that rank's row of the send buffer and leaves r = (x + r) - dequantize(q) in the same pass;
``requantize_mean`` dequantizes the W received chunks, averages and requantizes them into the all-gather's row
and adds the owner's W (a_j - dequantize(quantize(a_j))) to r; ``dequantize_into`` writes the gathered rows
straight into the bucket.  A row is the chunk's codes, padded to 4 bytes, then its float32 scales.
"""

from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ...ops.quantize import dequantize_into, quantize_into, requantize_mean
from ...quant import FORMATS
from ...cost.collectives import bytes_sent
from ._common import HookState, all_gather_single, submit


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

    def compress(self, bucket: dist.GradBucket, x: Tensor) -> Iterator[None]:
        world, n, rank, idx = self.world_size, x.numel(), dist.get_rank(self.process_group), bucket.index()
        bs = self.block_size
        chunk = -(-n // (world * bs)) * bs
        res = self.residual(idx, x, torch.float32) if self.error_feedback else None
        # rank j's part of the bucket, x[j C : (j + 1) C] (shorter or empty at the end), quantized straight into
        # row j of the send buffer; what lies past n stays zero (codes 0, scales 0: the zero padding's)
        send = self.buffer(idx, "send", (world, self.row_bytes(chunk)), torch.uint8, x.device)
        for j, part in self.parts(n, chunk):
            quantize_into(x[part], None if res is None else res[part],
                          *self.fields(send[j], chunk, part.stop - part.start), self.fmt, bs)
        recv = self.buffer(idx, "recv", send.shape, torch.uint8, x.device)
        work = dist.all_to_all_single(recv, send, group=self.process_group, async_op=True)
        yield
        work.wait()

        # a = (1/W) sum_src dequantize(chunk of src), requantized into the gathered row; the error feedback of
        # the requantization goes to this rank's own part of the residual
        own = slice(min(rank * chunk, n), min((rank + 1) * chunk, n))
        one = self.buffer(idx, "one", (1, self.row_bytes(chunk)), torch.uint8, x.device)
        requantize_mean(*self.fields(recv, chunk, chunk), *self.fields(one[0], chunk, chunk),
                        None if res is None else res[own], bs)
        gathered = self.buffer(idx, "gathered", (world, one.shape[1]), torch.uint8, x.device)
        work = all_gather_single(gathered, one, group=self.process_group, async_op=True)
        yield
        work.wait()
        for j, part in self.parts(n, chunk):
            dequantize_into(*self.fields(gathered[j], chunk, part.stop - part.start), bs, x[part])
        if res is not None and not bool(torch.isfinite(self.fields(gathered, chunk, chunk)[1]).all()):
            res.zero_()
        self.count(bytes_sent("all_to_all", send.nbytes, world) + bytes_sent("all_gather", one.nbytes * world, world),
                   bytes_sent("all_reduce", x.nbytes, world))

    def buffer(self, bucket_index: int, name: str, shape: Tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
        """A persistent work buffer of the bucket (zeros when first made): a fresh bucket-sized tensor each
        step would be page-faulted in again, which costs more than the codec passes themselves."""
        bufs = self.scratch.setdefault(bucket_index, {})
        buf = bufs.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            buf = bufs[name] = torch.zeros(shape, dtype=dtype, device=device)
        return buf

    @staticmethod
    def parts(n: int, chunk: int) -> Iterator[Tuple[int, slice]]:
        """(j, slice of x) of the ranks j whose chunk holds elements of x (the last ones may hold none)."""
        for j, lo in enumerate(range(0, n, chunk)):
            yield j, slice(lo, min(lo + chunk, n))

    def row_bytes(self, chunk: int) -> int:
        """Bytes of one packed chunk: its codes, padded to 4 bytes, then its float32 scales."""
        return -(-chunk // 4) * 4 + 4 * (chunk // self.block_size)

    def fields(self, row: Tensor, chunk: int, m: int) -> Tuple[Tensor, Tensor]:
        """(codes, scales) of the first m elements of the packed chunk(s) ``row`` (one row, or (rows, bytes)):
        views in the format's dtype and float32."""
        codes = row[..., :m].view(FORMATS[self.fmt].dtype)
        at = -(-chunk // 4) * 4
        return codes, row[..., at:].view(torch.float32)[..., :-(-m // self.block_size)]


def quantized_allreduce_hook(state: QuantState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: 8-bit quantized averaged all-reduce (``DDP.register_comm_hook(state, quantized_allreduce_hook)``).

    The returned future holds the bucket's buffer, averaged over the ranks up to the quantization error.
    """
    return submit("quantized_allreduce_hook", state, QuantState, bucket)
