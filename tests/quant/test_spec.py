"""QuantSpec validation and the exact byte count of the wire format."""

from __future__ import annotations

import math

import pytest
import torch

from halfbyte.quant import Packed, QuantSpec, quantize


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": 4.0}, "bits"),  # a float that compares equal to 4 must not slip through
        ({"bits": "4"}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -128}, "group_size"),
        ({"group_size": 127}, "group_size"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": 128.0}, "group_size"),
        ({"symmetric": 1}, "symmetric"),
        ({"rounding": "floor"}, "rounding"),
        ({"rounding": "Nearest"}, "rounding"),
        ({"hadamard": -32}, "hadamard"),
        ({"hadamard": 1}, "hadamard"),
        ({"hadamard": 24}, "hadamard"),
        ({"hadamard": 32.0}, "hadamard"),
        ({"group_size": 64, "hadamard": 128}, "hadamard"),  # block larger than the group
        ({"group_size": 96, "hadamard": 64}, "hadamard"),  # block does not divide the group
        ({"bits": 2, "group_size": 6}, "group_size"),  # 2 bits: a group must fill whole bytes
        ({"bits": 2, "group_size": 2}, "group_size"),
    ],
)
def test_invalid_spec_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bits": 8, "group_size": 2048, "symmetric": False, "rounding": "stochastic"},
        {"group_size": 2},
        {"group_size": 6},
        {"group_size": 128, "hadamard": 128},
        {"group_size": 96, "hadamard": 32},
        {"hadamard": 0},
        {"bits": 2},
        {"bits": 2, "group_size": 4, "symmetric": False, "rounding": "stochastic"},
        {"bits": 2, "group_size": 128, "rounding": "stochastic", "hadamard": 32},
    ],
)
def test_valid_spec_is_accepted(kwargs: dict) -> None:
    QuantSpec(**kwargs)


def test_qmax_and_str() -> None:
    assert QuantSpec(4).qmax == 7 and QuantSpec(8).qmax == 127
    assert QuantSpec(4, symmetric=False).qmax == 15 and QuantSpec(8, symmetric=False).qmax == 255
    # int2: symmetric has the 3 levels -1, 0, +1; asymmetric all 4 (0..3 above the zero point)
    assert QuantSpec(2).qmax == 1 and QuantSpec(2, symmetric=False).qmax == 3
    assert str(QuantSpec(2, 128, rounding="stochastic", hadamard=32)) == "int2/g128/sr/H32"
    spec = QuantSpec(4, 128, symmetric=False, rounding="stochastic", hadamard=32)
    assert str(spec) == "int4/g128/asym/sr/H32"


def expected_wire_bytes(numel: int, bits: int, group: int, symmetric: bool) -> tuple[int, int]:
    """(payload, scales + zeros) in bytes, from the format description rather than the spec code."""
    groups = math.ceil(numel / group)
    payload = groups * group * bits // 8
    meta = groups * 2 * (1 if symmetric else 2)  # one bf16 scale (+ one bf16 zero point) per group
    return payload, meta


@pytest.mark.parametrize("numel", [1, 127, 128, 129, 1000, 1_000_003])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_wire_bytes_exact(numel: int, bits: int, symmetric: bool) -> None:
    spec = QuantSpec(bits, 128, symmetric=symmetric)
    payload, meta = expected_wire_bytes(numel, bits, 128, symmetric)
    assert spec.payload_nbytes(numel) == payload
    assert spec.meta_nbytes(numel) == meta
    assert spec.wire_nbytes(numel) == payload + meta
    assert spec.num_groups(numel) == math.ceil(numel / 128)
    assert spec.padded_numel(numel) == math.ceil(numel / 128) * 128
    packed = quantize(torch.randn(numel), spec)
    assert packed.nbytes == packed.data.numel() == payload + meta


@pytest.mark.parametrize("numel", [1, 127, 129, 4097])
@pytest.mark.parametrize("group", [2, 6, 34, 2048])
def test_wire_bytes_odd_groups(numel: int, group: int) -> None:
    # group_size % 4 == 2 with int4 gives odd payloads: the byte count must still be exact.
    spec = QuantSpec(4, group)
    payload, meta = expected_wire_bytes(numel, 4, group, True)
    packed = quantize(torch.randn(numel), spec)
    assert packed.nbytes == spec.wire_nbytes(numel) == payload + meta


@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, True), (8, 128, True), (4, 2048, True),
                                                    (4, 128, False), (8, 32, False), (2, 128, True),
                                                    (2, 128, False), (2, 4, True)])
def test_bits_per_value(bits: int, group: int, symmetric: bool) -> None:
    spec = QuantSpec(bits, group, symmetric=symmetric)
    want = bits + 16 / group * (1 if symmetric else 2)
    assert spec.bits_per_value == pytest.approx(want, rel=0, abs=1e-12)
    numel = 64 * group  # whole groups: the wire holds exactly bits_per_value per value
    assert spec.wire_nbytes(numel) * 8 == pytest.approx(want * numel, rel=0, abs=1e-6)


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 127, 129, 1001])
def test_int2_wire_bytes(numel: int) -> None:
    # int2: a quarter byte per value, whole groups; group 4 makes that ceil(numel / 4) bytes
    g4 = QuantSpec(2, 4)
    assert g4.payload_nbytes(numel) == math.ceil(numel / 4)
    assert g4.wire_nbytes(numel) == math.ceil(numel / 4) * (1 + 2)
    g128 = QuantSpec(2, 128, symmetric=False)
    groups = math.ceil(numel / 128)
    assert g128.wire_nbytes(numel) == groups * 32 + groups * 2 * 2
    assert QuantSpec(2, 128).bits_per_value == 2.125 and g128.bits_per_value == 2.25


def test_packed_rejects_wrong_buffer() -> None:
    spec = QuantSpec(4, 128)
    good = quantize(torch.randn(300), spec)
    with pytest.raises(ValueError, match="Packed.data"):
        Packed(good.data[:-1], spec, 300, good.shape, good.dtype)
    with pytest.raises(ValueError, match="Packed.data"):
        Packed(good.data.to(torch.int16), spec, 300, good.shape, good.dtype)
    with pytest.raises(ValueError, match="Packed.data"):
        Packed(good.data.view(2, -1), spec, 300, good.shape, good.dtype)
