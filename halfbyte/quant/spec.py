"""QuantSpec: what a codec does, and the exact size of what it puts on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Rounding = Literal["nearest", "stochastic"]

#: Bytes of one scale (and of one zero point): scales travel as bfloat16, whose exponent range
#: equals fp32's, so tiny gradients and huge activations both keep a representable scale.
SCALE_BYTES = 2


@dataclass(frozen=True)
class QuantSpec:
    """A group-wise integer codec.

    bits:       2 (four values per byte), 4 (two per byte) or 8. 2 bits are meant for the outer
                exchange of local updates (with error feedback): only the plain-torch reference
                codes them (the Triton entry points fall back to it), and CommConfig refuses them.
    group_size: consecutive values sharing one scale; a positive even number (a multiple of 4 for
                2 bits, so every group fills whole bytes), and a multiple of `hadamard` when on.
    symmetric:  True: scale = absmax / qmax, levels -qmax..qmax (qmax 1 for int2: the 3 levels
                -1, 0, +1, one of the 4 codes unused; 7 for int4, 127 for int8).
                False: zero point = the group minimum, scale = (max - zero) / (2**bits - 1):
                all 2**bits levels (int2: 0..3), at one more bf16 per group (the zero point).
                Scales round up and zero points down to bf16, so no value falls outside the levels.
    rounding:   "nearest" (round half to even) or "stochastic" (unbiased, seeded).
    hadamard:   block size of the orthonormal Walsh-Hadamard rotation applied before quantizing and
                inverted after dequantizing; 0 turns it off, else a power of two <= group_size.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    rounding: Rounding = "nearest"
    hadamard: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in (2, 4, 8):
            raise ValueError(f"QuantSpec.bits must be 2, 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(
                f"QuantSpec.group_size must be a positive even integer, got {self.group_size!r}"
            )
        if self.bits == 2 and self.group_size % 4:
            raise ValueError(
                f"QuantSpec.group_size must be a multiple of 4 with bits=2 (four values per byte), "
                f"got {self.group_size}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be True or False, got {self.symmetric!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"QuantSpec.rounding must be 'nearest' or 'stochastic', got {self.rounding!r}"
            )
        h = self.hadamard
        if not isinstance(h, int) or h < 0:
            raise ValueError(f"QuantSpec.hadamard must be 0 (off) or a power of two, got {h!r}")
        if h:
            if h & (h - 1) or h < 2:
                raise ValueError(f"QuantSpec.hadamard must be 0 (off) or a power of two >= 2, got {h}")
            if h > self.group_size or self.group_size % h:
                raise ValueError(
                    f"QuantSpec.group_size ({self.group_size}) must be a multiple of "
                    f"QuantSpec.hadamard ({h})"
                )

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """Largest level magnitude (symmetric: 1, 7, 127) or largest level (asymmetric: 3, 15, 255)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def padded_numel(self, numel: int) -> int:
        """Values after padding to whole groups."""
        g = self.group_size
        return -(-numel // g) * g

    def num_groups(self, numel: int) -> int:
        return self.padded_numel(numel) // self.group_size

    def payload_nbytes(self, numel: int) -> int:
        """Bytes of the packed levels: padded values * bits / 8 (exact: int2 groups are multiples
        of 4 values and int4 groups even, so every group fills whole bytes)."""
        return self.padded_numel(numel) * self.bits // 8

    def meta_nbytes(self, numel: int) -> int:
        """Scales (and zero points when asymmetric)."""
        per_group = SCALE_BYTES * (1 if self.symmetric else 2)
        return self.num_groups(numel) * per_group

    def wire_nbytes(self, numel: int) -> int:
        """Exact bytes of the packed buffer for `numel` values: payload, then scales, then zeros."""
        return self.payload_nbytes(numel) + self.meta_nbytes(numel)

    @property
    def bits_per_value(self) -> float:
        """Wire bits per value for whole groups: bits + 16/group (+16/group if asymmetric)."""
        return self.bits + 8 * SCALE_BYTES * (1 if self.symmetric else 2) / self.group_size

    def __str__(self) -> str:
        s = f"int{self.bits}/g{self.group_size}"
        if not self.symmetric:
            s += "/asym"
        if self.rounding == "stochastic":
            s += "/sr"
        if self.hadamard:
            s += f"/H{self.hadamard}"
        return s
