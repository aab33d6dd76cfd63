"""Quantization core: group-wise int2/int4/int8 codecs (int2 in the reference only), Hadamard smoothing, bit packing.

`quantize`, `dequantize`, `dequantize_sum`, `reduce_requantize` and the all-to-all message forms
`quantize_messages` / `dequantize_messages` / `reduce_requantize_messages` run the fused Triton kernels for
CUDA tensors when Triton is importable, and the plain-torch reference otherwise. Set
HALFBYTE_QUANT_BACKEND=reference to force the reference (e.g. to compare). No torch.distributed here.
"""

from halfbyte.quant.codec import (
    backend_for,
    dequantize,
    dequantize_messages,
    dequantize_sum,
    quantize,
    quantize_messages,
    reduce_requantize,
    reduce_requantize_messages,
)
from halfbyte.quant.hadamard import fwht
from halfbyte.quant.packed import Packed, to_message_major, to_section_major
from halfbyte.quant.reference import fp32_reciprocal
from halfbyte.quant.spec import QuantSpec

__all__ = [
    "Packed",
    "QuantSpec",
    "backend_for",
    "dequantize",
    "dequantize_messages",
    "dequantize_sum",
    "fp32_reciprocal",
    "fwht",
    "quantize",
    "quantize_messages",
    "reduce_requantize",
    "reduce_requantize_messages",
    "to_message_major",
    "to_section_major",
]
