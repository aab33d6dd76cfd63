"""The orthonormal fast Walsh-Hadamard transform, and what it buys int4 on outliers."""

from __future__ import annotations

import pytest
import torch

from halfbyte.quant import QuantSpec, dequantize, fwht, quantize


def sylvester(b: int) -> torch.Tensor:
    """Explicit orthonormal Hadamard matrix H_b / sqrt(b), built by Sylvester's doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / b**0.5


@pytest.mark.parametrize("block", [1, 2, 4, 8, 32, 128])
def test_fwht_matches_explicit_matrix(block: int) -> None:
    g = torch.Generator().manual_seed(block)
    x = torch.randn(6, 256, generator=g)
    want = (x.double().reshape(-1, block) @ sylvester(block).T).reshape(x.shape)
    got = fwht(x, block)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [2, 32, 256])
def test_fwht_orthonormal_and_self_inverse(block: int) -> None:
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(0))
    y = fwht(x, block)
    # norm preserved block by block, not only in total
    torch.testing.assert_close(y.reshape(-1, block).norm(dim=1), x.reshape(-1, block).norm(dim=1))
    torch.testing.assert_close(fwht(y, block), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x)  # it does rotate


def test_fwht_spreads_an_outlier_evenly() -> None:
    x = torch.zeros(64)
    x[5] = 8.0
    y = fwht(x, 64)
    torch.testing.assert_close(y.abs(), torch.full((64,), 1.0))


def test_fwht_input_dtypes_and_layouts() -> None:
    base = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    x = base[:, :64]  # non-contiguous rows
    want = fwht(x.contiguous(), 32)
    torch.testing.assert_close(fwht(x, 32), want)
    got = fwht(x.to(torch.bfloat16), 32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(x, base[:, :64])  # input untouched


@pytest.mark.parametrize("block", [0, -4, 3, 6, 24])
def test_fwht_rejects_non_power_of_two(block: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(96), block)


def test_fwht_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of the Hadamard block"):
        fwht(torch.zeros(100), 32)


def rel_error(x: torch.Tensor, spec: QuantSpec) -> float:
    return ((dequantize(quantize(x, spec)) - x).norm() / x.norm()).item()


def test_hadamard_lowers_int4_error_with_outliers() -> None:
    # Gaussian plus two 20-sigma outliers per group of 128: without rotation the outliers set the
    # scale and the rest of the group collapses onto a few levels. (Measured ~2.8x lower error.)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    where = torch.rand(2048, 128, generator=g).argsort(dim=1)[:, :2]
    x.scatter_(1, where, 20.0 * torch.randn(2048, 2, generator=g).sign())
    x = x.reshape(-1)
    plain, rotated = rel_error(x, QuantSpec(4, 128)), rel_error(x, QuantSpec(4, 128, hadamard=32))
    assert rotated * 1.5 < plain, (plain, rotated)


def test_hadamard_lowers_int4_error_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((1 << 18,))
    plain, rotated = rel_error(x, QuantSpec(4, 128)), rel_error(x, QuantSpec(4, 128, hadamard=32))
    assert rotated * 1.5 < plain, (plain, rotated)  # measured ~1.9x


def test_hadamard_costs_little_on_gaussian() -> None:
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    plain, rotated = rel_error(x, QuantSpec(4, 128)), rel_error(x, QuantSpec(4, 128, hadamard=32))
    assert rotated < 1.05 * plain, (plain, rotated)
