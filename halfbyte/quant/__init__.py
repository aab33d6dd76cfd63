"""Quantization core: group-wise int4/int8 codecs, Hadamard smoothing, bit packing.

`quantize`, `dequantize`, `dequantize_sum` and `reduce_requantize` run the fused Triton kernels for
CUDA tensors when Triton is importable, and the plain-torch reference otherwise. Set
HALFBYTE_QUANT_BACKEND=reference to force the reference (e.g. to compare). No torch.distributed here.
"""

from halfbyte.quant.codec import backend_for, dequantize, dequantize_sum, quantize, reduce_requantize
from halfbyte.quant.hadamard import fwht
from halfbyte.quant.packed import Packed
from halfbyte.quant.spec import QuantSpec

__all__ = [
    "Packed",
    "QuantSpec",
    "backend_for",
    "dequantize",
    "dequantize_sum",
    "fwht",
    "quantize",
    "reduce_requantize",
]
