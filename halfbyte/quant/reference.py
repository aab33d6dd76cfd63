"""Plain-torch codecs: the ground truth (CPU and GPU). The Triton kernels must produce the same bytes.

Exact arithmetic, so that another implementation can match it bit for bit (nearest rounding):
  values      v = x (fp32; minus `subtract` if given), zero-padded to whole groups,
              rotated by `fwht` when spec.hadamard and rotate
  symmetric   s = bf16_up(absmax / qmax);                       q = clamp(round(v / s), -qmax, qmax)
  asymmetric  z = bf16_down(min); s = bf16_up((max - z) / qmax); q = clamp(round((v - z) / s), 0, qmax)
              bf16_up / bf16_down: round to nearest bf16, then step one bf16 ulp up / down
              (torch.nextafter) if that landed below / above the fp32 value. So every value lies
              inside the level range: no clamping error (|v - v'| <= s/2 for nearest, < s for
              stochastic) and stochastic rounding stays unbiased for the group's extreme values.
  rounding    nearest: round half to even; stochastic: floor(y + u), u ~ U[0, 1) drawn from a
              torch.Generator seeded with `seed` (E[q] = y exactly, before clamping)
  s == 0      (all-zero group): q = 0
  non-finite  a group holding NaN/Inf (or, asymmetric only, a range max - min beyond fp32) gets
              s = NaN (and z = NaN) and q = 0, so it decodes to NaN: bad values propagate through
              every collective to the result, never into plausible numbers
  packing     int4: level + 8 (symmetric) or level (asymmetric) in a nibble, value 2i in the low
              nibble of byte i, 2i+1 in the high one; int8: the level as int8 (symmetric) or uint8;
              int2: level + 2 (symmetric, codes 1..3) or level (asymmetric, 0..3) in 2 bits, value
              4i + k in bits 2k, 2k+1 of byte i (4i in the lowest two). Reference only: the Triton
              entry points hand 2-bit specs back to this module.
  decode      v = q * s (+ z), inverse rotation, drop the padding.
"""

from __future__ import annotations

import torch

from halfbyte.quant.hadamard import fwht
from halfbyte.quant.packed import Packed, _check_message_numel, read_bf16, to_message_major, to_section_major
from halfbyte.quant.spec import QuantSpec


def _prepare(x: torch.Tensor, spec: QuantSpec, subtract: torch.Tensor | None, rotate: bool) -> torch.Tensor:
    v = x.reshape(-1).to(torch.float32)
    if subtract is not None:
        if subtract.numel() != x.numel():
            raise ValueError(f"subtract has {subtract.numel()} values, x has {x.numel()}")
        v = v - subtract.reshape(-1).to(torch.float32)
    pad = spec.padded_numel(v.numel()) - v.numel()
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    if spec.hadamard:
        if rotate:
            v = fwht(v, spec.hadamard)
        else:
            _check_whole_blocks(x.numel(), spec)
    return v.view(-1, spec.group_size)


def _check_chunks(chunks: torch.Tensor, spec: QuantSpec, numel: int) -> None:
    """W >= 1 received wire buffers of `numel` values each, as uint8 [W, wire_nbytes(numel)]."""
    if (chunks.dim() != 2 or chunks.shape[0] < 1 or chunks.shape[1] != spec.wire_nbytes(numel)
            or chunks.dtype != torch.uint8):
        raise ValueError(
            f"chunks must be [W >= 1, {spec.wire_nbytes(numel)}] uint8 for {numel} values with {spec}, "
            f"got {tuple(chunks.shape)} {chunks.dtype}"
        )


def _check_whole_blocks(numel: int, spec: QuantSpec) -> None:
    # Outside the rotated domain padding is zero; inside it a partial block's padding is not, so
    # values that stay rotated across hops must come in whole Hadamard blocks.
    if numel % spec.hadamard:
        raise ValueError(
            f"values kept in the Hadamard domain (rotate=False) must come in whole blocks: "
            f"{numel} is not a multiple of {spec.hadamard}"
        )


def _round(y: torch.Tensor, spec: QuantSpec, seed: int | None) -> torch.Tensor:
    if spec.rounding == "nearest":
        return torch.round(y)
    gen = torch.Generator(device=y.device).manual_seed(resolve_seed(seed))
    return torch.floor(y + torch.rand(y.shape, generator=gen, device=y.device))


def resolve_seed(seed: int | None) -> int:
    """A seed for stochastic rounding: the given one, else one drawn from torch's global RNG."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(seed)


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    seed: int | None = None,
    rotate: bool = True,
    subtract: torch.Tensor | None = None,
) -> Packed:
    """Quantize `x` (any shape, fp32/bf16/fp16) -> Packed. `subtract`: quantize x - subtract (qWD).

    `rotate=False` skips the Hadamard rotation for values that are already in the rotated domain
    (the middle hop of the two-level reduce-scatter).
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    v = _prepare(x, spec, subtract, rotate)
    qmax = spec.qmax
    if spec.symmetric:
        scale = _bf16_up(_div(v.abs().amax(dim=1), qmax))
        zero = None
        shifted = v
    else:
        lo, hi = v.amin(dim=1), v.amax(dim=1)
        zero = _bf16_down(lo)
        scale = _bf16_up(_div(hi - zero.float(), qmax))
        shifted = v - zero.float()[:, None]
    s = scale.float()
    finite = torch.isfinite(v).all(dim=1) & torch.isfinite(s)
    usable = finite & (s > 0)
    y = shifted / torch.where(usable, s, torch.ones_like(s))[:, None]
    y = torch.where(usable[:, None], y, torch.zeros_like(y))
    lo_level = -qmax if spec.symmetric else 0
    q = _round(y, spec, seed).clamp_(lo_level, qmax)
    nan = torch.tensor(float("nan"), dtype=torch.bfloat16, device=v.device)
    scale = torch.where(finite, scale, nan)

    parts = [_pack_levels(q.reshape(-1), spec), scale.view(torch.uint8)]
    if zero is not None:
        parts.append(torch.where(finite, zero, nan).view(torch.uint8))
    return Packed(torch.cat(parts), spec, x.numel(), x.shape, x.dtype)


def _div(t: torch.Tensor, qmax: int) -> torch.Tensor:
    """IEEE t / qmax on every device: CUDA turns division by a Python scalar into multiplication
    by its reciprocal, which differs in the last bit now and then (and so would the scale)."""
    return t / torch.full_like(t, qmax)


def _bf16_up(t: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= t (fp32 in)."""
    b = t.to(torch.bfloat16)
    return torch.where(b.float() < t, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def _bf16_down(t: torch.Tensor) -> torch.Tensor:
    """The largest bfloat16 <= t (fp32 in)."""
    b = t.to(torch.bfloat16)
    return torch.where(b.float() > t, torch.nextafter(b, torch.full_like(b, float("-inf"))), b)


def _pack_levels(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.bits == 8:
        return q.to(torch.int8).view(torch.uint8) if spec.symmetric else q.to(torch.uint8)
    if spec.bits == 2:
        u = (q + 2 if spec.symmetric else q).to(torch.uint8).view(-1, 4)
        return u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6)
    u = (q + 8 if spec.symmetric else q).to(torch.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack(data: torch.Tensor, spec: QuantSpec, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Wire bytes -> (levels as fp32 [groups, group_size], scales fp32 [groups], zeros or None)."""
    n_pay = spec.payload_nbytes(numel)
    groups = spec.num_groups(numel)
    payload = data[:n_pay]
    if spec.bits == 8:
        q = payload.view(torch.int8) if spec.symmetric else payload
    elif spec.bits == 2:
        q = torch.stack([(payload >> shift) & 0x3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
        if spec.symmetric:
            q = q.to(torch.int8) - 2
    else:
        q = torch.stack((payload & 0xF, payload >> 4), dim=1).reshape(-1)
        if spec.symmetric:
            q = q.to(torch.int8) - 8
    scale = read_bf16(data, n_pay, groups)
    zero = None if spec.symmetric else read_bf16(data, n_pay + 2 * groups, groups)
    return q.to(torch.float32).view(groups, spec.group_size), scale, zero


def _decode(data: torch.Tensor, spec: QuantSpec, numel: int) -> torch.Tensor:
    """Decode one chunk to fp32, padded, still in the rotated domain."""
    q, scale, zero = unpack(data, spec, numel)
    v = q * scale[:, None]
    if zero is not None:
        v = v + zero[:, None]
    return v.reshape(-1)


def _finish(v: torch.Tensor, spec: QuantSpec, numel: int, shape: torch.Size, dtype: torch.dtype,
            out: torch.Tensor | None, accumulate: bool, rotate: bool, divisor: int = 1) -> torch.Tensor:
    if spec.hadamard:
        if rotate:
            v = fwht(v, spec.hadamard)
        else:
            _check_whole_blocks(numel, spec)
    v = v[:numel]
    if divisor != 1:
        v = v * fp32_reciprocal(divisor)
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` tensor to add into")
        return v.to(dtype).view(shape)
    if out.numel() != numel:
        raise ValueError(f"out has {out.numel()} values, the packed data holds {numel}")
    if accumulate:
        out.add_(v.view(out.shape))
    else:
        out.copy_(v.view(out.shape))
    return out


def dequantize(
    packed: Packed,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    rotate: bool = True,
) -> torch.Tensor:
    """Packed -> tensor of the original shape and dtype; or write (accumulate: add) into `out`."""
    v = _decode(packed.data, packed.spec, packed.numel)
    return _finish(v, packed.spec, packed.numel, packed.shape, packed.dtype, out, accumulate, rotate)


def quantize_messages(x: torch.Tensor, spec: QuantSpec, *, seed: int | None = None) -> torch.Tensor:
    """Quantize the n rows of x ([n, m], m whole groups) as one tensor -> uint8 [n, wire_nbytes(m)],
    row i the wire format of row i: the bytes of `quantize(x)` (stochastic draws included), laid out
    one message per all-to-all peer. x may also be [n, k, c] (any strides, e.g. a transposed view):
    message i is then x[i, 0], ..., x[i, k-1] in order, m = k * c values, as if x were reshaped to
    [n, m] first (the Triton kernels read such a view in place when c is whole groups)."""
    check_message_input(x)
    n, m = x.shape[0], x[0].numel()
    _check_message_numel(spec, m)
    return to_message_major(quantize(x.reshape(-1), spec, seed=seed).data, spec, n, m)


def check_message_input(x: torch.Tensor) -> None:
    """quantize_messages' input: a floating-point [messages, values] or [messages, pieces, values]."""
    if x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"quantize_messages expects a 2-D [messages, values] or 3-D [messages, pieces, "
                         f"values] floating-point tensor, got {tuple(x.shape)} {x.dtype}")


def dequantize_messages(messages: torch.Tensor, spec: QuantSpec, m: int, *, out: torch.Tensor | None = None,
                        accumulate: bool = False, rotate: bool = True) -> torch.Tensor:
    """Decode each row of `messages` ([n, wire_nbytes(m)]) on its own, no reduction -> fp32 [n, m];
    or write (accumulate: add) into `out` (n*m values)."""
    _check_chunks(messages, spec, m)
    _check_message_numel(spec, m)
    n = messages.shape[0]
    packed = Packed(to_section_major(messages, spec, m), spec, n * m, torch.Size([n, m]), torch.float32)
    if out is None:
        return dequantize(packed, rotate=rotate)
    if out.numel() != n * m:
        raise ValueError(f"out has {out.numel()} values, the messages hold {n * m}")
    dequantize(packed, out=out.view(n, m), accumulate=accumulate, rotate=rotate)
    return out


def dequantize_sum(
    chunks: torch.Tensor,
    spec: QuantSpec,
    numel: int,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    rotate: bool = True,
    divisor: int = 1,
) -> torch.Tensor:
    """Decode W received chunks (uint8 [W, wire_nbytes(numel)]) and sum them in fp32: the reduce
    step of a reduce-scatter. Returns a 1-D tensor of `numel` values in `dtype` unless `out` given.
    divisor: the fp32 sum (Hadamard undone) is multiplied by fp32_reciprocal(divisor) before the
    cast (W: the average)."""
    _check_chunks(chunks, spec, numel)
    _check_divisor(divisor)
    total = _decode(chunks[0], spec, numel)
    for w in range(1, chunks.shape[0]):
        total = total + _decode(chunks[w], spec, numel)
    return _finish(total, spec, numel, torch.Size([numel]), dtype, out, accumulate, rotate, divisor)


def fp32_reciprocal(n: int) -> float:
    """1/n rounded to fp32. Averages multiply by it rather than divide: one IEEE product gives the
    same bits on every device (torch on CUDA turns a division by a scalar into this product too)."""
    return torch.tensor(1.0 / n, dtype=torch.float32).item()


def _check_divisor(divisor: int) -> None:
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor must be a positive int, got {divisor!r}")


def reduce_requantize(
    chunks: torch.Tensor,
    in_spec: QuantSpec,
    numel: int,
    out_spec: QuantSpec,
    *,
    seed: int | None = None,
) -> Packed:
    """Middle hop of the two-level reduce-scatter: decode + sum W chunks and quantize the sum with
    `out_spec`, staying in the rotated (Hadamard) domain throughout."""
    if in_spec.hadamard != out_spec.hadamard:
        raise ValueError(
            f"reduce_requantize keeps the rotated domain: in_spec.hadamard ({in_spec.hadamard}) "
            f"must equal out_spec.hadamard ({out_spec.hadamard})"
        )
    total = dequantize_sum(chunks, in_spec, numel, rotate=False)
    return quantize(total, out_spec, seed=seed, rotate=False)


def reduce_requantize_messages(chunks: torch.Tensor, in_spec: QuantSpec, n: int, m: int, out_spec: QuantSpec, *,
                               seed: int | None = None) -> torch.Tensor:
    """`reduce_requantize` of W chunks of n*m values whose result goes out as n all-to-all messages
    of m values (m whole out_spec groups) -> uint8 [n, out_spec.wire_nbytes(m)]: the bytes of
    `to_message_major(reduce_requantize(...).data, out_spec, n, m)`, stochastic draws included."""
    _check_message_numel(out_spec, m)
    packed = reduce_requantize(chunks, in_spec, n * m, out_spec, seed=seed)
    return to_message_major(packed.data, out_spec, n, m)
