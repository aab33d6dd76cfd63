"""Packed: one contiguous wire buffer (payload, then scales, then zero points) plus what decodes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halfbyte.quant.spec import QuantSpec


def read_bf16(data: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` bfloat16 values stored in the uint8 tensor `data` from byte `start`, as fp32."""
    section = data[start : start + 2 * count]
    # int4 with group_size % 4 == 2 has an odd payload, and a row of a [W, nbytes] receive buffer
    # can start at an odd byte: a bf16 view needs an even offset, so copy the (small) section.
    if section.storage_offset() % 2:
        section = section.clone()
    return section.view(torch.bfloat16).float()


@dataclass
class Packed:
    """Quantized values ready to send.

    data:  1-D uint8 tensor of exactly `spec.wire_nbytes(numel)` bytes: the packed integers of all
           groups, then one bfloat16 scale per group, then (asymmetric only) one bfloat16 zero point
           per group. One collective moves all of it.
    numel, shape, dtype: the original tensor, restored by `dequantize`.
    """

    data: torch.Tensor
    spec: QuantSpec
    numel: int
    shape: torch.Size
    dtype: torch.dtype

    def __post_init__(self) -> None:
        want = self.spec.wire_nbytes(self.numel)
        if self.data.dtype != torch.uint8 or self.data.dim() != 1 or self.data.numel() != want:
            raise ValueError(
                f"Packed.data must be a 1-D uint8 tensor of {want} bytes for {self.numel} values "
                f"with {self.spec}, got {tuple(self.data.shape)} {self.data.dtype}"
            )

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire."""
        return self.data.numel()

    def scales(self) -> torch.Tensor:
        """Per-group scales as fp32 (a view-based decode of the scale section)."""
        start = self.spec.payload_nbytes(self.numel)
        return read_bf16(self.data, start, self.spec.num_groups(self.numel))

    def has_nonfinite(self) -> bool:
        """True when the input held NaN or Inf: such groups carry a NaN scale and decode to NaN.

        Synchronizes with the device; meant for checks and tests, not the hot path.
        """
        return bool(torch.isnan(self.scales()).any())


# ---- messages: n wire buffers side by side, one per all-to-all peer ----------------------------
def _sections(spec: QuantSpec, numel: int) -> list[int]:
    """Byte sizes of the wire sections of `numel` values: payload, scales (, zero points)."""
    meta = [2 * spec.num_groups(numel)] * (1 if spec.symmetric else 2)
    return [spec.payload_nbytes(numel), *meta]


def _check_message_numel(spec: QuantSpec, m: int) -> None:
    if m % spec.group_size:
        raise ValueError(f"message length {m} must be whole groups of {spec.group_size}")


def to_message_major(data: torch.Tensor, spec: QuantSpec, n: int, m: int) -> torch.Tensor:
    """Wire bytes of n*m values (m whole groups per message) -> [n, wire_nbytes(m)]: row i is
    exactly the wire format of values i*m .. (i+1)*m - 1, ready for an all-to-all."""
    _check_message_numel(spec, m)
    sizes = _sections(spec, m)
    parts = data.split([n * s for s in sizes])
    return torch.cat([p.view(n, s) for p, s in zip(parts, sizes)], dim=1)


def to_section_major(messages: torch.Tensor, spec: QuantSpec, m: int) -> torch.Tensor:
    """Inverse of `to_message_major`: [n, wire_nbytes(m)] -> one wire buffer of n*m values."""
    parts = messages.split(_sections(spec, m), dim=1)
    return torch.cat([p.reshape(-1) for p in parts])
