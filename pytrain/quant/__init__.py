"""8-bit quantization (int8, fp8 e4m3 / e5m2) with per-tensor, per-block and per-axis scales.

    from pytrain.quant import quantize, dequantize
    qt = quantize(grad, "int8", block_size=256)          # QTensor: int8 codes + float32 scales
    approx = dequantize(qt)                              # float32, grad's shape
    qt.nbytes                                            # codes + scales
"""
from ..ops.quantize import FORMATS
from .quantize import QTensor, dequantize, quantize

__all__ = ["quantize", "dequantize", "QTensor", "FORMATS"]
