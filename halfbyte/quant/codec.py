"""Backend dispatch: the Triton kernels for CUDA tensors, the reference everywhere else.

Both backends expose the same seven functions with the same signatures and wire format.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from halfbyte.quant import reference
from halfbyte.quant.packed import Packed
from halfbyte.quant.spec import QuantSpec


@functools.cache
def _triton_module() -> ModuleType | None:
    try:
        from halfbyte.quant import triton_kernels
    except ImportError:  # no triton: CPU-only installs never need it
        return None
    return triton_kernels


def backend_for(t: torch.Tensor) -> ModuleType:
    """The module that implements the codecs for tensors like `t`."""
    choice = os.environ.get("HALFBYTE_QUANT_BACKEND", "auto")
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"HALFBYTE_QUANT_BACKEND must be auto, reference or triton, got {choice!r}")
    if choice == "reference" or not t.is_cuda:
        return reference
    mod = _triton_module()
    if mod is None:
        if choice == "triton":
            raise RuntimeError("HALFBYTE_QUANT_BACKEND=triton but triton is not importable")
        return reference
    return mod


def quantize(x: torch.Tensor, spec: QuantSpec, *, seed: int | None = None, rotate: bool = True,
             subtract: torch.Tensor | None = None) -> Packed:
    return backend_for(x).quantize(x, spec, seed=seed, rotate=rotate, subtract=subtract)


def dequantize(packed: Packed, *, out: torch.Tensor | None = None, accumulate: bool = False,
               rotate: bool = True) -> torch.Tensor:
    return backend_for(packed.data).dequantize(packed, out=out, accumulate=accumulate, rotate=rotate)


def quantize_messages(x: torch.Tensor, spec: QuantSpec, *, seed: int | None = None) -> torch.Tensor:
    return backend_for(x).quantize_messages(x, spec, seed=seed)


def dequantize_messages(messages: torch.Tensor, spec: QuantSpec, m: int, *, out: torch.Tensor | None = None,
                        accumulate: bool = False, rotate: bool = True) -> torch.Tensor:
    return backend_for(messages).dequantize_messages(messages, spec, m, out=out, accumulate=accumulate,
                                                     rotate=rotate)


def dequantize_sum(chunks: torch.Tensor, spec: QuantSpec, numel: int, *,
                   dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                   accumulate: bool = False, rotate: bool = True, divisor: int = 1) -> torch.Tensor:
    return backend_for(chunks).dequantize_sum(
        chunks, spec, numel, dtype=dtype, out=out, accumulate=accumulate, rotate=rotate, divisor=divisor
    )


def reduce_requantize(chunks: torch.Tensor, in_spec: QuantSpec, numel: int, out_spec: QuantSpec, *,
                      seed: int | None = None) -> Packed:
    return backend_for(chunks).reduce_requantize(chunks, in_spec, numel, out_spec, seed=seed)


def reduce_requantize_messages(chunks: torch.Tensor, in_spec: QuantSpec, n: int, m: int, out_spec: QuantSpec, *,
                               seed: int | None = None) -> torch.Tensor:
    return backend_for(chunks).reduce_requantize_messages(chunks, in_spec, n, m, out_spec, seed=seed)


quantize.__doc__ = reference.quantize.__doc__
dequantize.__doc__ = reference.dequantize.__doc__
dequantize_sum.__doc__ = reference.dequantize_sum.__doc__
quantize_messages.__doc__ = reference.quantize_messages.__doc__
dequantize_messages.__doc__ = reference.dequantize_messages.__doc__
reduce_requantize.__doc__ = reference.reduce_requantize.__doc__
reduce_requantize_messages.__doc__ = reference.reduce_requantize_messages.__doc__
