"""The Triton kernels against the plain-torch reference, on the GPU (skipped without CUDA/Triton).

Nearest rounding: the same wire bytes (Hadamard included, see triton_kernels' docstring; with
Hadamard on, at most HADAMARD_MISMATCH of the levels may differ, by one level, should a compiler
reorder the butterflies). Decoding: within 1e-6 relative. Stochastic rounding: a different random
stream, so the distribution is tested: within one level, unbiased over seeds, reproducible.
"""

from __future__ import annotations

import pytest
import torch

from halfbyte.quant import Packed, reference, to_message_major, to_section_major
from halfbyte.quant.spec import QuantSpec

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton"),
]

HADAMARD_MISMATCH = 1e-4  # documented bound on 1-level differences with Hadamard on
SIZES = [1, 37, 4099, 65536, 1_000_003]
SPECS = [
    QuantSpec(bits=8, group_size=128, hadamard=32),
    QuantSpec(bits=4, group_size=128, hadamard=32),
    QuantSpec(bits=4, group_size=2048),
    QuantSpec(bits=8, group_size=64, symmetric=False),
    QuantSpec(bits=4, group_size=256, symmetric=False, hadamard=16),
]


@pytest.fixture(scope="module")
def tk():
    from halfbyte.quant import triton_kernels

    return triton_kernels


def _levels(packed) -> torch.Tensor:
    q, _, _ = reference.unpack(packed.data, packed.spec, packed.numel)
    return q


def assert_same_wire(ours, ref) -> None:
    """Bytes equal; with Hadamard on, a tiny fraction of levels may be one apart (same scales)."""
    assert ours.nbytes == ref.nbytes
    if torch.equal(ours.data, ref.data):
        return
    assert ours.spec.hadamard, f"{ours.spec}: wire bytes differ from the reference"
    torch.testing.assert_close(ours.scales(), ref.scales(), rtol=0, atol=0, equal_nan=True)
    diff = (_levels(ours) - _levels(ref)).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= HADAMARD_MISMATCH


def _randn(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    # heavy-ish tails so that group scales vary and Hadamard has outliers to spread
    x = torch.randn(n, device="cuda", generator=g) * torch.rand(n, device="cuda", generator=g).pow(4) * 10
    return x.to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_quantize_bytes_match_reference(tk, spec, dtype, n):
    x = _randn(n, dtype, seed=n)
    assert_same_wire(tk.quantize(x, spec), reference.quantize(x, spec))


@pytest.mark.parametrize("spec", SPECS[1:3], ids=str)
def test_quantize_subtract_and_shapes(tk, spec):
    master = _randn(3 * 4099, torch.float32, seed=1).view(3, 4099)
    replica = (master + _randn(3 * 4099, torch.float32, seed=2).view(3, 4099) * 1e-3).to(torch.bfloat16)
    ours = tk.quantize(master, spec, subtract=replica)
    assert ours.shape == master.shape and ours.dtype == torch.float32
    assert_same_wire(ours, reference.quantize(master, spec, subtract=replica))
    with pytest.raises(ValueError, match="subtract"):
        tk.quantize(master, spec, subtract=replica[:2])


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [37, 65536, 1_000_003])
def test_dequantize_matches_reference(tk, spec, out_dtype, n):
    x = _randn(n, out_dtype, seed=3 + n)
    packed = reference.quantize(x, spec)
    ours, ref = tk.dequantize(packed), reference.dequantize(packed)
    assert ours.dtype == ref.dtype == out_dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=1e-6 * ref.float().abs().max().item())
    if not spec.hadamard:
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("spec", [SPECS[2], SPECS[1], SPECS[3]], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_accumulate(tk, spec, out_dtype):
    n = 100_003
    packed = reference.quantize(_randn(n, torch.float32, seed=5), spec)
    base = _randn(n, out_dtype, seed=6)
    ours, ref = base.clone(), base.clone()
    assert tk.dequantize(packed, out=ours, accumulate=True) is ours
    reference.dequantize(packed, out=ref, accumulate=True)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, base)
    with pytest.raises(ValueError, match="accumulate"):
        tk.dequantize(packed, accumulate=True)
    with pytest.raises(ValueError, match="out has"):
        tk.dequantize(packed, out=base[:-1])


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("W", [1, 5, 11])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("divisor", [1, 3])
def test_dequantize_sum_matches_reference(tk, spec, W, rotate, divisor):
    n = 32 * 3001  # whole Hadamard blocks, not whole groups
    chunks = torch.stack([reference.quantize(_randn(n, torch.float32, seed=10 + w), spec).data for w in range(W)])
    ours = tk.dequantize_sum(chunks, spec, n, rotate=rotate, divisor=divisor)
    ref = reference.dequantize_sum(chunks, spec, n, rotate=rotate, divisor=divisor)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    if not spec.hadamard or not rotate:
        assert torch.equal(ours, ref)  # the average is the same fp32 product
        half = tk.dequantize_sum(chunks, spec, n, rotate=rotate, divisor=divisor, dtype=torch.bfloat16)
        assert torch.equal(half, ref.bfloat16())
    acc_ours, acc_ref = torch.ones(n, device="cuda"), torch.ones(n, device="cuda")
    tk.dequantize_sum(chunks, spec, n, out=acc_ours, accumulate=True, rotate=rotate, divisor=divisor)
    reference.dequantize_sum(chunks, spec, n, out=acc_ref, accumulate=True, rotate=rotate, divisor=divisor)
    torch.testing.assert_close(acc_ours, acc_ref, rtol=1e-6, atol=1e-6 * acc_ref.abs().max().item())


@pytest.mark.parametrize("spec", [*SPECS, QuantSpec(bits=4, group_size=128, hadamard=32, rounding="stochastic"),
                                  QuantSpec(bits=4, group_size=2048, rounding="stochastic")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_messages_match_the_flat_codec(tk, spec, dtype):
    """One launch over n rows writes each row's wire buffer in place: the bytes of quantizing the
    whole tensor (stochastic draws keyed by the global index), laid out one message per row."""
    n, m = 5, 3 * spec.group_size + 2 * max(spec.group_size, 2048)  # rows end mid-tile
    x = _randn(n * m, dtype, seed=3).view(n, m)
    ours = tk.quantize_messages(x, spec, seed=11)
    flat = tk.quantize(x.reshape(-1), spec, seed=11)
    assert torch.equal(ours, to_message_major(flat.data, spec, n, m))
    if spec.rounding == "nearest":
        ref = reference.quantize_messages(x, spec)
        as_packed = lambda msgs: Packed(to_section_major(msgs, spec, m), spec, n * m, torch.Size([n * m]), dtype)
        assert_same_wire(as_packed(ours), as_packed(ref))
    decoded = tk.dequantize_messages(ours, spec, m)
    want = reference.dequantize_messages(ours, spec, m)
    torch.testing.assert_close(decoded, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    if not spec.hadamard:
        assert torch.equal(decoded, want)
    replica = torch.ones(n * m, dtype=torch.bfloat16, device="cuda")
    expect = replica.clone()
    tk.dequantize_messages(ours, spec, m, out=replica, accumulate=True)
    reference.dequantize_messages(ours, spec, m, out=expect, accumulate=True)
    assert (replica.float() - expect.float()).abs().max().item() <= 1e-2 * expect.float().abs().max().item()
    if not spec.hadamard:
        assert torch.equal(replica, expect)


@pytest.mark.parametrize("spec", [QuantSpec(8, 128, hadamard=32, rounding="stochastic"), QuantSpec(4, 128),
                                  QuantSpec(4, 64, symmetric=False, rounding="stochastic"),
                                  QuantSpec(8, 256, hadamard=16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, L, groups", [(2, 2, 3), (3, 2, 17), (2, 4, 1)])
def test_messages_of_strided_pieces_are_read_in_place(tk, spec, dtype, M, L, groups):
    """The two-level send side: message l holds chunk l of every node, a [L, M, c] transposed view
    of the bucket. The kernel reads it where it lies and writes the bytes of gathering it first."""
    c = groups * spec.group_size
    view = _randn(M * L * c, dtype, seed=M * L + groups).view(M, L, c).transpose(0, 1)
    ours = tk.quantize_messages(view, spec, seed=21)
    gathered = view.reshape(L, M * c).contiguous()
    assert torch.equal(ours, tk.quantize_messages(gathered, spec, seed=21))
    assert torch.equal(ours, to_message_major(tk.quantize(gathered.reshape(-1), spec, seed=21).data, spec, L, M * c))
    if spec.rounding == "nearest":
        as_packed = lambda msgs: Packed(to_section_major(msgs, spec, M * c), spec, L * M * c,  # noqa: E731
                                        torch.Size([L * M * c]), dtype)
        assert_same_wire(as_packed(ours), as_packed(reference.quantize_messages(view, spec)))


def test_messages_of_pieces_not_whole_groups_are_gathered_first(tk):
    spec = QuantSpec(4, 256)
    view = _randn(2 * 3 * 128, torch.float32, seed=4).view(2, 3, 128).transpose(0, 1)  # 2 pieces = 1 group
    assert torch.equal(tk.quantize_messages(view, spec), reference.quantize_messages(view, spec))


@pytest.mark.parametrize("W", [2, 4, 8])
@pytest.mark.parametrize(
    "in_spec,out_spec",
    [
        (QuantSpec(8, 128, hadamard=32), QuantSpec(4, 128, hadamard=32, rounding="stochastic")),
        (QuantSpec(8, 128, hadamard=32), QuantSpec(4, 128, hadamard=32)),
        (QuantSpec(8, 64, symmetric=False), QuantSpec(4, 64, rounding="stochastic")),
        (QuantSpec(8, 128, hadamard=32), QuantSpec(4, 256, hadamard=32)),  # two-pass path
    ],
    ids=str,
)
@pytest.mark.parametrize("n, m_groups", [(2, 3), (3, 18), (5, 1)])  # messages end mid-tile or are one group
def test_reduce_requantize_messages_write_each_message_in_place(tk, W, in_spec, out_spec, n, m_groups):
    """The middle hop: one launch writes the n messages where they go, with the bytes (stochastic
    draws included) of the flat kernel followed by to_message_major."""
    m = m_groups * max(in_spec.group_size, out_spec.group_size)
    chunks = torch.stack([reference.quantize(_randn(n * m, torch.float32, seed=30 + w), in_spec, rotate=False).data
                          for w in range(W)])
    ours = tk.reduce_requantize_messages(chunks, in_spec, n, m, out_spec, seed=17)
    flat = tk.reduce_requantize(chunks, in_spec, n * m, out_spec, seed=17)
    assert torch.equal(ours, to_message_major(flat.data, out_spec, n, m))
    if out_spec.rounding == "nearest":
        want = reference.reduce_requantize(chunks, in_spec, n * m, out_spec)
        assert_same_wire(Packed(to_section_major(ours, out_spec, m), out_spec, n * m, torch.Size([n * m]),
                                torch.float32), want)


def test_dequantize_sum_strided_rows_and_bad_shape(tk):
    spec, n = SPECS[1], 4096
    nbytes = spec.wire_nbytes(n)
    big = torch.stack([reference.quantize(_randn(n, torch.float32, seed=w), spec).data for w in range(6)])
    padded = torch.zeros(6, nbytes + 64, dtype=torch.uint8, device="cuda")
    padded[:, :nbytes] = big
    view = padded[:, :nbytes]  # row stride != row length
    assert torch.equal(tk.dequantize_sum(view, spec, n), reference.dequantize_sum(big, spec, n))
    with pytest.raises(ValueError, match="chunks must be"):
        tk.dequantize_sum(big[:, :-1], spec, n)


@pytest.mark.parametrize("W", [2, 4, 8, 10])
@pytest.mark.parametrize(
    "in_spec,out_spec",
    [
        (QuantSpec(8, 128, hadamard=32), QuantSpec(4, 128, hadamard=32)),
        (QuantSpec(8, 128), QuantSpec(4, 128, symmetric=False)),
        (QuantSpec(8, 128, hadamard=32), QuantSpec(4, 256, hadamard=32)),  # two-pass path
    ],
    ids=str,
)
def test_reduce_requantize_matches_reference(tk, W, in_spec, out_spec):
    n = 32 * 4099
    chunks = torch.stack([reference.quantize(_randn(n, torch.float32, seed=20 + w), in_spec).data for w in range(W)])
    ours = tk.reduce_requantize(chunks, in_spec, n, out_spec)
    assert_same_wire(ours, reference.reduce_requantize(chunks, in_spec, n, out_spec))
    with pytest.raises(ValueError, match="hadamard"):
        tk.reduce_requantize(chunks, in_spec, n, QuantSpec(4, 128, hadamard=16))


@pytest.mark.parametrize("spec", [QuantSpec(4, 2048, rounding="stochastic"),
                                  QuantSpec(4, 128, rounding="stochastic", hadamard=32),
                                  QuantSpec(8, 64, symmetric=False, rounding="stochastic")], ids=str)
def test_stochastic_unbiased_within_one_level(tk, spec):
    n, seeds = 8192, 256
    x = _randn(n, torch.float32, seed=7)
    first = tk.quantize(x, spec, seed=0)
    assert torch.equal(first.data, tk.quantize(x, spec, seed=0).data), "not reproducible from the seed"
    assert not torch.equal(first.data, tk.quantize(x, spec, seed=1).data)
    # the same scales as the reference (only the rounding is random)
    torch.testing.assert_close(first.scales(), reference.quantize(x, spec, seed=0).scales(), rtol=0, atol=0)
    step = first.scales().repeat_interleave(spec.group_size)[:n]
    if spec.hadamard:  # the error bound holds in the rotated domain
        from halfbyte.quant.hadamard import fwht

        target = fwht(x, spec.hadamard)
        decode = lambda p: tk.dequantize(p, rotate=False)  # noqa: E731
    else:
        target, decode = x, tk.dequantize
    total = torch.zeros(n, dtype=torch.float64, device="cuda")
    for seed in range(seeds):
        d = decode(tk.quantize(x, spec, seed=seed))
        assert ((d - target).abs() <= step * (1 + 1e-6)).all(), "stochastic rounding moved more than one level"
        total += d.double()
    # each value is a Bernoulli step: the mean over seeds has std <= step / (2 sqrt(seeds))
    z = (total / seeds - target.double()).abs() / (step.double() / (2 * seeds**0.5)).clamp_min(1e-30)
    assert z.max().item() < 6.0, "biased: mean over seeds strays beyond 6 sigma"
    assert z.mean().item() < 1.0


def test_stochastic_tile_shape_independent(tk):
    spec = QuantSpec(4, 128, rounding="stochastic")
    x = _randn(50_000, torch.bfloat16, seed=8)
    a = tk.quantize(x, spec, seed=123, tile_values=1024, num_warps=4)
    b = tk.quantize(x, spec, seed=123, tile_values=8192, num_warps=8)
    assert torch.equal(a.data, b.data)


def test_nonfinite_groups_decode_to_nan(tk):
    spec = QuantSpec(4, 128, hadamard=32)
    x = _randn(1024, torch.float32, seed=9)
    x[5], x[700] = float("nan"), float("inf")
    ours = tk.quantize(x, spec)
    assert_same_wire(ours, reference.quantize(x, spec))
    assert ours.has_nonfinite()
    d = tk.dequantize(ours).view(8, 128)
    assert d[0].isnan().all() and d[5].isnan().all() and not d[1].isnan().any()


def test_rotate_false_needs_whole_blocks(tk):
    spec = QuantSpec(8, 128, hadamard=32)
    with pytest.raises(ValueError, match="whole blocks"):
        tk.quantize(_randn(100, torch.float32, seed=0), spec, rotate=False)


def test_fallback_for_unsupported_group_size(tk):
    spec = QuantSpec(4, 96)
    x = _randn(1000, torch.float32, seed=11)
    assert torch.equal(tk.quantize(x, spec).data, reference.quantize(x, spec).data)


def test_dispatch_uses_triton_for_cuda(tk):
    from halfbyte import quant

    x = torch.zeros(4, device="cuda")
    assert quant.backend_for(x) is tk
    assert quant.backend_for(x.cpu()) is reference


@pytest.mark.parametrize("spec", [QuantSpec(bits=2, group_size=128), QuantSpec(bits=2, group_size=128, symmetric=False),
                                  QuantSpec(bits=2, group_size=128, rounding="stochastic", hadamard=32)], ids=str)
def test_two_bit_specs_run_the_reference(tk, spec):
    # The kernels have no 2-bit code: every entry point hands a 2-bit spec to the reference, so the
    # bytes are the reference's exactly (stochastic draws included: the same torch.Generator stream).
    n, W, m = 4 * 3 * 1024, 3, 1024
    x = _randn(n, torch.float32, seed=7)
    ours = tk.quantize(x, spec, seed=1)
    assert torch.equal(ours.data, reference.quantize(x, spec, seed=1).data)
    torch.testing.assert_close(tk.dequantize(ours), reference.dequantize(ours), rtol=0, atol=0)
    msgs = tk.quantize_messages(x.view(12, m), spec, seed=2)
    assert torch.equal(msgs, reference.quantize_messages(x.view(12, m), spec, seed=2))
    assert torch.equal(tk.dequantize_messages(msgs, spec, m), reference.dequantize_messages(msgs, spec, m))
    chunks = torch.stack([reference.quantize(_randn(n, torch.float32, seed=w), spec).data for w in range(W)])
    assert torch.equal(tk.dequantize_sum(chunks, spec, n), reference.dequantize_sum(chunks, spec, n))
    int8 = QuantSpec(bits=8, group_size=128, hadamard=spec.hadamard)
    assert torch.equal(tk.reduce_requantize(chunks, spec, n, int8, seed=3).data,
                       reference.reduce_requantize(chunks, spec, n, int8, seed=3).data)
    assert torch.equal(tk.reduce_requantize_messages(chunks, spec, 12, m, int8, seed=3),
                       reference.reduce_requantize_messages(chunks, spec, 12, m, int8, seed=3))
