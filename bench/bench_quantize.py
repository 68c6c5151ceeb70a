"""pytrain.quant.quantize / dequantize against the same maths composed from torch ops, on 16M fp32 elements
(N = 2^24) with one scale per block of 256, for int8 and fp8_e4m3.  Both providers run in one process on
the same input.

torch composition (what one writes without a fused kernel):
  quantize    xb = x.view(-1, 256); scale = xb.abs().amax(1, keepdim=True) / qmax
              int8: (xb / scale).round().clamp(-127, 127).to(int8);  fp8: (xb / scale).clamp(-448, 448).to(fp8)
  dequantize  codes.view(-1, 256).float() * scale

Byte model (what the fused kernels must move; GB/s and the fraction of the copy ceiling use it):
  quantize    read x 4 N + write codes N + write scales 4 N / 256      = 5.016 N bytes
  dequantize  read codes N + read scales 4 N / 256 + write out 4 N     = 5.016 N bytes
The quantize / dequantize cases allocate their outputs on every call (as those functions do); on the CPU a
fresh 64 MiB float32 output is page-faulted in on each call, which the copy ceiling (into a reused buffer)
does not pay.  The "_into" cases write into buffers made once (``quantize_into`` / ``dequantize_into``, what
the quantized all-reduce hook calls; torch: the same maths into preallocated tensors with ``out=`` and in-place
ops), which is what the kernels themselves cost.
Targets: >= 60% of the measured copy bandwidth, >= 20x faster than the torch composition.
"""
import pytest
import torch

from pytrain.ops.quantize import dequantize_into, quantize_into
from pytrain.quant import FORMATS, dequantize, quantize

PROVIDERS = ("torch", "pytrain")
N, BLOCK = 1 << 24, 256
BYTES = 5 * N + 4 * N // BLOCK
TARGET = ">= 60% of copy bandwidth, >= 20x faster than torch"


def torch_quantize(x, fmt):
    spec = FORMATS[fmt]
    xb = x.view(-1, BLOCK)
    scale = xb.abs().amax(1, keepdim=True) / spec.qmax
    y = xb / scale
    if fmt == "int8":
        return y.round().clamp(-127, 127).to(torch.int8), scale
    return y.clamp(-spec.qmax, spec.qmax).to(spec.dtype), scale


def torch_dequantize(codes, scale):
    return (codes.view(-1, BLOCK).float() * scale).view(-1)


@pytest.fixture(scope="module")
def data(bench_device):
    return torch.randn(N, device=bench_device, generator=torch.Generator(bench_device).manual_seed(0))


def torch_quantize_into(x, fmt, codes, scale, work):
    """torch_quantize's maths into preallocated codes (N,), scale (N / BLOCK, 1) and float32 work (N,)."""
    spec = FORMATS[fmt]
    xb, yb = x.view(-1, BLOCK), work.view(-1, BLOCK)
    torch.amax(torch.abs(xb, out=yb), 1, keepdim=True, out=scale).div_(spec.qmax)
    torch.div(xb, scale, out=yb)
    if fmt == "int8":
        yb.round_().clamp_(-127, 127)
    else:
        yb.clamp_(-spec.qmax, spec.qmax)
    codes.copy_(work)


def torch_dequantize_into(codes, scale, out):
    out.copy_(codes).view(-1, BLOCK).mul_(scale)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("direction", ["quantize", "dequantize", "quantize_into", "dequantize_into"])
def test_quantize(direction, fmt, provider, impl, data, measure):
    if direction.endswith("_into"):
        return _test_into(direction, fmt, provider, impl, data, measure)
    if provider == "torch":
        codes, scale = torch_quantize(data, fmt)
        step = (lambda: torch_quantize(data, fmt)) if direction == "quantize" else (lambda: torch_dequantize(codes, scale))
    else:
        qt = quantize(data, fmt, block_size=BLOCK, impl=impl)
        step = (lambda: quantize(data, fmt, block_size=BLOCK, impl=impl)) if direction == "quantize" else \
            (lambda: dequantize(qt, impl=impl))
    measure(step, case=f"{direction} {fmt} block {BLOCK}, 16M fp32", provider=provider, bytes_moved=BYTES,
            op=direction, impl=impl, baseline="torch ops: abs().amax, divide, round, clamp, cast", target=TARGET)


def _test_into(direction, fmt, provider, impl, data, measure):
    codes = torch.empty(N, dtype=FORMATS[fmt].dtype, device=data.device)
    scales = torch.empty(N // BLOCK, device=data.device)
    out = torch.empty(N, device=data.device)
    if provider == "torch":
        codes_t, scale = torch_quantize(data, fmt)
        codes_t = codes_t.view(-1)
        if direction == "quantize_into":
            step = lambda: torch_quantize_into(data, fmt, codes_t, scale, out)  # noqa: E731
        else:
            step = lambda: torch_dequantize_into(codes_t, scale, out)  # noqa: E731
    elif direction == "quantize_into":
        step = lambda: quantize_into(data, None, codes, scales, fmt, BLOCK, impl=impl)  # noqa: E731
    else:
        quantize_into(data, None, codes, scales, fmt, BLOCK, impl=impl)
        step = lambda: dequantize_into(codes, scales, BLOCK, out, impl=impl)  # noqa: E731
    measure(step, case=f"{direction} {fmt} block {BLOCK}, 16M fp32, reused buffers", provider=provider,
            bytes_moved=BYTES, op=direction, impl=impl,
            baseline="torch ops into preallocated tensors (out=, in place)", target=TARGET)
