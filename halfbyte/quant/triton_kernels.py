"""Fused Triton kernels for the group-wise codecs (CUDA tensors).

Same seven functions, signatures and wire bytes as `reference.py`, whose docstring defines the
arithmetic. Each kernel makes one pass over memory: a program owns a tile of whole groups, keeps it in
registers through subtract -> Hadamard -> absmax -> scale -> round -> pack (or unpack -> scale ->
sum over chunks -> inverse Hadamard -> add into `out`), and writes each output byte once.

Exactness (nearest rounding): the kernels perform the reference's fp32 operations in the same order
with the same IEEE rounding, so they write the same bytes, Hadamard included:
  - divisions are IEEE round-to-nearest, not Triton's approximate `/`: `tl.math.div_rn` once per
    group, and per value a multiply by the group's correctly rounded reciprocal plus one FMA
    correction, which is the IEEE quotient (see _divide_by_scale);
  - round-half-to-even is the exact `y + 1.5 * 2**23`, whose low mantissa bits are then the level
    (valid for |y| < 2**22; here |y| <= qmax + 1): no libdevice call, no float-to-int conversion;
  - scales round up and zero points down to bf16 (the reference's _bf16_up/_bf16_down), done on
    the bits; other bf16/fp16 casts round to nearest even;
  - the Walsh-Hadamard butterflies pair the same elements in the same stage order as `fwht` and
    scale once at the end; the W chunks are summed in chunk order, like the reference;
  - kernels are compiled with `enable_fp_fusion=False`, so no multiply-add is contracted into an
    FMA (which would round once instead of twice); the only FMAs are the explicit `tl.fma`s.
Stochastic rounding draws its uniforms from Philox (`tl.randint4x`, 24-bit uniforms in [0, 1)) keyed by
the seed and the element index: reproducible from the seed and independent of the tile shape, but not
the reference's torch.Generator stream, so only the distribution matches the reference.

Falls back to the reference for what the kernels do not cover: 2-bit specs (see _supported_spec),
group_size not a power of two in [8, 16384], input or `out` dtypes other than fp32/bf16/fp16, a
non-contiguous `out`, non-CUDA tensors.
`reduce_requantize` with different in/out group sizes runs two Triton passes (dequantize_sum, then
quantize) instead of one fused kernel.

Messages. The all-to-all forms write n wire buffers side by side ([n, wire_nbytes(m)]) in the same
launch, each program placing its groups at their offset in their message, with the stochastic draws
keyed by the group's index in the whole [n, m] tensor: the bytes of the flat kernel followed by
`to_message_major`, without that copy. `quantize_messages` also reads a message made of k strided
pieces (a [n, k, c] view, c whole groups) in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from halfbyte.quant import reference
from halfbyte.quant.packed import Packed, _check_message_numel
from halfbyte.quant.spec import QuantSpec

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_GROUP, _MAX_GROUP = 8, 16384
# Values per program (tile = whole groups). Streaming kernels want a few thousand values per program
# in flight: enough bytes per load for 16-byte vectors, few enough registers for good occupancy.
_TILE_VALUES = 2048
# Values per thread run on the paths that keep runs in registers (Hadamard quantize, reduce_requantize):
# whole H32 blocks, and a group's scale work shared by 32 values
_RUN = tl.constexpr(32)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds |y| < 2**22 half-to-even


# ---- device helpers -------------------------------------------------------------------------------
@triton.jit
def _butterfly(y, NB: tl.constexpr, H: tl.constexpr, h: tl.constexpr):
    """One Walsh-Hadamard stage on [NB, H]: value c*2h + i pairs with c*2h + h + i, (a, b) -> (a+b, a-b)."""
    y = tl.permute(tl.reshape(y, (NB, H // (2 * h), 2, h)), (0, 1, 3, 2))
    a, b = tl.split(y)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (NB, H))


@triton.jit
def _fwht(v, LOG2_H: tl.constexpr):
    """Orthonormal Walsh-Hadamard transform of each run of 2**LOG2_H values along the last axis of a
    2-D tile: the stages and pairings of `hadamard.fwht`, then one scale by 1/sqrt(H)."""
    H: tl.constexpr = 1 << LOG2_H
    SCALE: tl.constexpr = H**-0.5  # rounded to fp32 like the reference's python-float multiply
    R: tl.constexpr = v.shape[0]
    C: tl.constexpr = v.shape[1]
    NB: tl.constexpr = R * C // H
    y = tl.reshape(v, (NB, H))
    for s in tl.static_range(LOG2_H):
        y = _butterfly(y, NB, H, 1 << s)
    y = y * SCALE
    return tl.reshape(y, (R, C))


@triton.jit
def _run_byte_offsets(NR: tl.constexpr, RUN_BYTES: tl.constexpr, VB: tl.constexpr):
    """Byte offsets [NR, RUN_BYTES // VB, VB] of NR consecutive runs of RUN_BYTES bytes, in VB-byte
    vectors: the shape that lets each thread load or store its run with 16-byte accesses."""
    return (tl.arange(0, NR)[:, None, None] * RUN_BYTES + tl.arange(0, RUN_BYTES // VB)[None, :, None] * VB
            + tl.arange(0, VB)[None, None, :])


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _bf16_directed(t, UP: tl.constexpr):
    """fp32 -> the nearest bfloat16 above (UP) or below t: the reference's _bf16_up / _bf16_down."""
    bits = t.to(tl.uint32, bitcast=True)
    inexact = (bits & 0xFFFF) != 0
    negative = (bits >> 31) != 0
    # truncation rounds toward zero; step the magnitude one ulp when that went the wrong way
    upper = (bits >> 16) + (inexact & (negative != UP)).to(tl.uint32)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _uniform_tile(seed, counter0, BG: tl.constexpr, GS: tl.constexpr):
    """[BG, GS] uniforms in [0, 1) on a 2**-24 grid; four per Philox call, keyed by element index."""
    j = tl.arange(0, BG)[:, None] * (GS // 4) + tl.arange(0, GS // 4)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter0 + j)
    step: tl.constexpr = 1.0 / 16777216.0
    u0 = (r0 >> 8).to(tl.float32) * step
    u1 = (r1 >> 8).to(tl.float32) * step
    u2 = (r2 >> 8).to(tl.float32) * step
    u3 = (r3 >> 8).to(tl.float32) * step
    u = tl.join(tl.join(u0, u1), tl.join(u2, u3))
    return tl.reshape(u, (BG, GS))


@triton.jit
def _divide_by_scale(v, s, usable):
    """v / s rounded to nearest (IEEE), for a per-group [BG, 1] bf16 scale s; 0 where not usable.

    One Markstein correction of v * RN(1/s) gives RN(v / s) whenever no term is subnormal: checked
    exhaustively for every bf16 mantissa of s and fp32 mantissa of v. So the IEEE division (a MUFU
    reciprocal, five FMAs and a range check each) runs once per group, and each value pays a multiply
    and two FMAs. Scales below 2**-100 and their values are first lifted by 2**64, which is exact
    and leaves v / s alone; then every term is normal wherever |v / s| >= 1/2 (where it could change
    a level), and 1/s stays normal since s <= fp32 max / qmax.
    """
    lift = tl.where(s < 2.0**-100, 2.0**64, 1.0)
    s = tl.where(usable, s * lift, 1.0)
    r = tl.math.div_rn(1.0, s)
    v = v * lift
    q = v * r
    y = tl.fma(tl.fma(-s, q, v), r, q)
    return tl.where(usable, y, 0.0)


@triton.jit
def _quantize_tile(v, out_ptr, g0, group_end, num_groups, pay_bytes, seed, rng_g0,
                   BG: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr,
                   SYMMETRIC: tl.constexpr, STOCHASTIC: tl.constexpr, RUN: tl.constexpr):
    """Quantize the fp32 tile v [BG, GS] as groups g0..g0+BG-1 of the wire buffer at out_ptr (of
    num_groups groups, payload pay_bytes) and write levels, scales, zeros of the groups < group_end.
    rng_g0: the index of group g0 in the whole tensor, which keys the stochastic draws.

    Per-group values stay [BG, 1] columns of the tile's own layout: a 1-D vector would make the
    compiler recompute the whole tile in a second layout just to store the scales. RUN > 0: each
    thread holds runs of RUN values (see _load_runs); the payload is stored in that shape, so the
    compiler keeps the bytes where they are instead of regrouping them through shared memory.
    """
    rows = tl.arange(0, BG)[:, None]
    row_ok = rows < group_end - g0
    # NaN-propagating extremes: one reduction gives both the scale and the NaN/Inf check
    if SYMMETRIC:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        LO: tl.constexpr = -QMAX
        absmax = tl.reduce(tl.abs(v), 1, _max_nan, keep_dims=True)
        finite = absmax < float("inf")
        scale_b = _bf16_directed(tl.math.div_rn(absmax, QMAX * 1.0), True)
        shifted = v
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        LO: tl.constexpr = 0
        lo = tl.reduce(v, 1, _min_nan, keep_dims=True)
        hi = tl.reduce(v, 1, _max_nan, keep_dims=True)
        finite = (lo > -float("inf")) & (hi < float("inf"))
        zero_b = _bf16_directed(lo, False)
        z = zero_b.to(tl.float32)
        scale_b = _bf16_directed(tl.math.div_rn(hi - z, QMAX * 1.0), True)
        shifted = v - z
    s = scale_b.to(tl.float32)
    finite = finite & (s < float("inf"))
    y = _divide_by_scale(shifted, s, finite & (s > 0))
    if STOCHASTIC:
        y = tl.floor(y + _uniform_tile(seed, (rng_g0 * (GS // 4)).to(tl.int32), BG, GS))
    # clamping commutes with rounding to an integer; adding 1.5 * 2**23 rounds half-to-even
    # (|y| < 2**22) and leaves level + 0x4B400000 in the bits, so the low bits are the level's
    q = (tl.minimum(tl.maximum(y, LO), QMAX) + _RNE_MAGIC).to(tl.int32, bitcast=True)

    if BITS == 8:
        byte = q.to(tl.uint8)  # two's complement (symmetric) or unsigned: the level's low byte
        PER_BYTE: tl.constexpr = 1
    else:
        if SYMMETRIC:
            q = q + 8
        lo_nib, hi_nib = tl.split(tl.reshape(q, (BG, GS // 2, 2)))
        byte = ((lo_nib & 15) | (hi_nib << 4)).to(tl.uint8)
        PER_BYTE: tl.constexpr = 2
    ROW: tl.constexpr = GS // PER_BYTE
    pay = out_ptr + g0 * ROW
    if RUN > 0:
        NR: tl.constexpr = BG * GS // RUN
        RUN_BYTES: tl.constexpr = RUN // PER_BYTE
        VB: tl.constexpr = min(16, RUN_BYTES)
        offs = _run_byte_offsets(NR, RUN_BYTES, VB)
        ok = offs < (group_end - g0) * ROW
        tl.store(pay + offs, tl.reshape(byte, (NR, RUN_BYTES // VB, VB)), mask=ok)
    else:
        tl.store(pay + rows * ROW + tl.arange(0, ROW)[None, :], byte, mask=row_ok)
    # a group holding NaN/Inf gets a NaN scale (and zero point): it decodes to NaN
    scale_ptr = (out_ptr + pay_bytes).to(tl.pointer_type(tl.bfloat16)) + g0
    nan = tl.full(scale_b.shape, 0x7FC0, tl.uint16).to(tl.bfloat16, bitcast=True)  # torch's NaN bits
    tl.store(scale_ptr + rows, tl.where(finite, scale_b, nan), mask=row_ok)
    if not SYMMETRIC:
        tl.store(scale_ptr + num_groups + rows, tl.where(finite, zero_b, nan), mask=row_ok)


@triton.jit
def _levels(code, OFFSET: tl.constexpr):
    """Integer codes (int32 in 0..255) minus OFFSET as exact fp32: the code in the low mantissa bits of
    2**23, minus 2**23 + OFFSET. Two full-rate instructions instead of a quarter-rate I2F."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _decode_tile(chunk_ptr, g0, num_groups, pay_bytes, BG: tl.constexpr, GS: tl.constexpr,
                 BITS: tl.constexpr, SYMMETRIC: tl.constexpr, RUN: tl.constexpr):
    """Decode groups g0..g0+BG-1 of one wire buffer to an fp32 tile [BG, GS] (rotated domain).
    RUN > 0: read as runs of RUN values, one run per thread (see _load_runs)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    if RUN > 0:
        NR: tl.constexpr = BG * GS // RUN
        RUN_BYTES: tl.constexpr = RUN // PER_BYTE
        VB: tl.constexpr = min(16, RUN_BYTES)
        offs = _run_byte_offsets(NR, RUN_BYTES, VB)
        raw = tl.load(chunk_ptr + g0 * (GS // PER_BYTE) + offs, mask=offs < (num_groups - g0) * (GS // PER_BYTE),
                      other=0)
        raw = tl.reshape(raw, (NR, RUN_BYTES)).to(tl.int32)
        rows = tl.arange(0, NR)[:, None] // (GS // RUN)  # the group of each run
        row_ok = rows < num_groups - g0
    else:
        NR: tl.constexpr = BG
        rows = tl.arange(0, BG)[:, None]
        row_ok = rows < num_groups - g0
        raw = tl.load(chunk_ptr + (g0 + rows) * (GS // PER_BYTE) + tl.arange(0, GS // PER_BYTE)[None, :],
                      mask=row_ok, other=0).to(tl.int32)
    if BITS == 8:
        if SYMMETRIC:  # two's complement byte b: (b ^ 0x80) is the level + 128
            q = _levels(raw ^ 0x80, 128)
        else:
            q = _levels(raw, 0)
    else:
        q = _levels(tl.reshape(tl.join(raw & 15, raw >> 4), (NR, raw.shape[1] * 2)), 8 if SYMMETRIC else 0)
    scale_ptr = (chunk_ptr + pay_bytes).to(tl.pointer_type(tl.bfloat16)) + g0
    v = q * tl.load(scale_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    if not SYMMETRIC:
        v = v + tl.load(scale_ptr + num_groups + rows, mask=row_ok, other=0).to(tl.float32)
    return tl.reshape(v, (BG, GS))


# ---- kernels ---------------------------------------------------------------------------------------
@triton.jit
def _load_runs(ptr, base, numel, NR: tl.constexpr, RUN: tl.constexpr, VEC: tl.constexpr):
    """NR runs of RUN values from ptr + base, as fp32 [NR, RUN] (zero past numel).

    Loaded as [NR, RUN // VEC, VEC], VEC values (16 bytes) per load: the compiler spreads the threads
    over the runs and keeps each run in one thread's registers (given NR >= the threads of the
    program), so Hadamard blocks up to RUN values need no shuffles or shared memory.
    """
    offs = (tl.arange(0, NR)[:, None, None] * RUN + tl.arange(0, RUN // VEC)[None, :, None] * VEC
            + tl.arange(0, VEC)[None, None, :])
    v = tl.load(ptr + base + offs, mask=offs < numel - base, other=0.0).to(tl.float32)
    return tl.reshape(v, (NR, RUN))


# seed changes every call: specializing it (== 1, multiple of 16) would compile a variant mid-run
@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(x_ptr, sub_ptr, out_ptr, numel, num_groups, pay_bytes, seed, out_row_stride,
                     in_row_stride, piece_stride, pieces,
                     BG: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                     STOCHASTIC: tl.constexpr, LOG2_H: tl.constexpr, HAS_SUB: tl.constexpr, VEC: tl.constexpr,
                     PIECES: tl.constexpr):
    # grid (tiles, pieces, messages): program (t, j, i) quantizes tile t of piece j of message i,
    # the `numel` values (num_groups groups) at x_ptr + i * in_row_stride + j * piece_stride, as
    # groups j * num_groups + ... of message i's wire buffer at out_ptr + i * out_row_stride (pay_bytes
    # of payload). One message of one piece is the plain quantize. PIECES: pieces > 1 (else the
    # piece terms compile away: one piece per message costs nothing for them)
    i = tl.program_id(2).to(tl.int64)
    x_ptr += i * in_row_stride
    sub_ptr += i * in_row_stride
    out_ptr += i * out_row_stride
    g0 = tl.program_id(0).to(tl.int64) * BG
    if PIECES:
        j = tl.program_id(1).to(tl.int64)
        x_ptr += j * piece_stride
        g_out = j * num_groups + g0  # this tile's first group in the message
        group_end = g_out - g0 + num_groups
        msg_groups = pieces * num_groups
    else:
        g_out, group_end, msg_groups = g0, num_groups, num_groups
    base = g0 * GS
    if LOG2_H > 0:
        RUN: tl.constexpr = min(GS, _RUN)
        NR: tl.constexpr = BG * GS // RUN
        v = _load_runs(x_ptr, base, numel, NR, RUN, VEC)
        if HAS_SUB:
            v = v - _load_runs(sub_ptr, base, numel, NR, RUN, VEC)
        v = tl.reshape(_fwht(v, LOG2_H), (BG, GS))
    else:
        RUN: tl.constexpr = 0
        local = tl.arange(0, BG)[:, None] * GS + tl.arange(0, GS)[None, :]
        m = local < numel - base
        v = tl.load(x_ptr + base + local, mask=m, other=0.0).to(tl.float32)
        if HAS_SUB:
            v = v - tl.load(sub_ptr + base + local, mask=m, other=0.0).to(tl.float32)
    _quantize_tile(v, out_ptr, g_out, group_end, msg_groups, pay_bytes, seed, i * msg_groups + g_out,
                   BG, GS, BITS, SYMMETRIC, STOCHASTIC, RUN)


@triton.jit
def _decode_sum_tile(chunks_ptr, chunk_stride, W, g0, num_groups, pay_bytes,
                     BG: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                     UNROLL: tl.constexpr, EXACT: tl.constexpr, RUN: tl.constexpr):
    """Sum of the decoded tiles of chunks 0..W-1, added in chunk order (as the reference does).
    Batches of UNROLL chunks; EXACT: UNROLL divides W - 1, so no batch runs past W."""
    total = _decode_tile(chunks_ptr, g0, num_groups, pay_bytes, BG, GS, BITS, SYMMETRIC, RUN)
    for w0 in range(1, W, UNROLL):
        for u in tl.static_range(UNROLL):  # independent loads, issued together
            w = w0 + u
            if EXACT:
                d = _decode_tile(chunks_ptr + w.to(tl.int64) * chunk_stride, g0, num_groups, pay_bytes,
                                 BG, GS, BITS, SYMMETRIC, RUN)
                total = total + d
            else:  # the last batch clamps its reads and skips the chunks past W
                ptr = chunks_ptr + tl.minimum(w, W - 1).to(tl.int64) * chunk_stride
                d = _decode_tile(ptr, g0, num_groups, pay_bytes, BG, GS, BITS, SYMMETRIC, RUN)
                total = tl.where(w < W, total + d, total)
    return total


@triton.jit
def _dequantize_sum_kernel(chunks_ptr, chunk_stride, W, out_ptr, numel, num_groups, pay_bytes, scale,
                           BG: tl.constexpr, GS: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                           LOG2_H: tl.constexpr, UNROLL: tl.constexpr, EXACT: tl.constexpr,
                           ACCUMULATE: tl.constexpr, SCALE: tl.constexpr, RUN: tl.constexpr):
    # grid (tiles, rows): with W = 1, row r decodes the wire buffer at chunks_ptr + r * chunk_stride
    # into out_ptr + r * numel (messages); one row sums the W chunks
    row = tl.program_id(1).to(tl.int64)
    chunks_ptr += row * chunk_stride
    out_ptr += row * numel
    g0 = tl.program_id(0).to(tl.int64) * BG
    # RUN > 0 (the host's choice, _decode_run): runs of RUN values per thread from the loads through
    # the Hadamard (16-byte loads; the Hadamard and the nibble interleave in registers), else group rows
    v = _decode_sum_tile(chunks_ptr, chunk_stride, W, g0, num_groups, pay_bytes, BG, GS, BITS, SYMMETRIC,
                         UNROLL, EXACT, RUN)
    if LOG2_H > 0:
        v = _fwht(v, LOG2_H)
    if SCALE:  # the average: times the fp32 reciprocal, as the reference
        v = v * scale
    if RUN > 0:
        # ...but group rows for the store: a thread's run of outputs is 128 bytes of fp32, so run-layout
        # stores touch one line per thread and instruction (1.4-3.6x slower on the H200); the values
        # regroup once, through shared memory, so that a warp writes whole lines
        v = tl.reshape(v, (BG, GS))
    base = g0 * GS
    local = tl.arange(0, BG)[:, None] * GS + tl.arange(0, GS)[None, :]
    m = local < numel - base
    ptr = out_ptr + base + local
    if ACCUMULATE:
        v = tl.load(ptr, mask=m, other=0.0).to(tl.float32) + v
    tl.store(ptr, v.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


# seed changes every call: specializing it (== 1, multiple of 16) would compile a variant mid-run
@triton.jit(do_not_specialize=["seed"])
def _reduce_requantize_kernel(chunks_ptr, chunk_stride, W, out_ptr, numel, num_groups, in_pay_bytes,
                              out_pay_bytes, seed, msg_groups, out_row_stride,
                              BG: tl.constexpr, GS: tl.constexpr, IN_BITS: tl.constexpr,
                              IN_SYMMETRIC: tl.constexpr, OUT_BITS: tl.constexpr, OUT_SYMMETRIC: tl.constexpr,
                              STOCHASTIC: tl.constexpr, UNROLL: tl.constexpr, EXACT: tl.constexpr,
                              PADDED: tl.constexpr, MESSAGES: tl.constexpr):
    # grid (tiles, messages): program (t, r) sums groups r * msg_groups + t * BG + ... of the W
    # chunks and writes them as groups t * BG + ... of message r's wire buffer (msg_groups groups,
    # out_pay_bytes of payload) at out_ptr + r * out_row_stride. One message is the flat result;
    # MESSAGES: more than one (else the message terms compile away)
    g0 = tl.program_id(0).to(tl.int64) * BG
    if MESSAGES:
        row = tl.program_id(1).to(tl.int64)
        g_in = row * msg_groups + g0
        out_ptr += row * out_row_stride
    else:
        g_in = g0
    RUN: tl.constexpr = min(GS, _RUN)
    # a message's last tile may read the next message's first groups: decoded, never stored
    v = _decode_sum_tile(chunks_ptr, chunk_stride, W, g_in, num_groups, in_pay_bytes, BG, GS, IN_BITS,
                         IN_SYMMETRIC, UNROLL, EXACT, RUN)
    if PADDED:  # the reference drops the decoded padding (a zero point, say) and re-pads with zeros
        local = tl.arange(0, BG)[:, None] * GS + tl.arange(0, GS)[None, :]
        v = tl.where(local < numel - g_in * GS, v, 0.0)
    _quantize_tile(v, out_ptr, g0, msg_groups, msg_groups, out_pay_bytes, seed, g_in,
                   BG, GS, OUT_BITS, OUT_SYMMETRIC, STOCHASTIC, RUN)


# ---- host side -------------------------------------------------------------------------------------
def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _supported_spec(spec: QuantSpec) -> bool:
    """Whether the kernels code `spec`; every entry point hands any other spec to the reference.
    bits == 2 always goes there: the kernels have no 2-bit code (none could be tested on a GPU), and
    2 bits serve the outer exchange of local updates, which runs every tau steps, so the
    reference's speed is fine there."""
    g = spec.group_size
    return spec.bits != 2 and g & (g - 1) == 0 and _MIN_GROUP <= g <= _MAX_GROUP


def launch_config(group_size: int, tile_values: int = _TILE_VALUES, num_warps: int | None = None,
                  runs: bool = False) -> tuple[int, int]:
    """(groups per program, warps) for a tile of about `tile_values` values (the bench sweeps these).
    runs: a kernel that keeps runs of _RUN values per thread; by default one run per thread."""
    groups = max(1, tile_values // group_size)
    values = groups * group_size
    if num_warps is None:
        if runs:
            num_warps = min(16, max(1, values // (32 * min(group_size, _RUN.value))))
        else:
            num_warps = 4 if values <= 4096 else 8 if values <= 8192 else 16
    return groups, num_warps


def _log2_hadamard(spec: QuantSpec, rotate: bool, numel: int) -> int:
    if not spec.hadamard:
        return 0
    if not rotate:
        reference._check_whole_blocks(numel, spec)
        return 0
    return spec.hadamard.bit_length() - 1


def _unroll(W: int) -> dict:
    # W <= 9: one fully unrolled pass over chunks 1..W-1; larger W: loop in steps of 8
    unroll = max(1, W - 1) if W <= 9 else 8
    return {"UNROLL": unroll, "EXACT": (W - 1) % unroll == 0}


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    seed: int | None = None,
    rotate: bool = True,
    subtract: torch.Tensor | None = None,
    tile_values: int = _TILE_VALUES,
    num_warps: int | None = None,
) -> Packed:
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if subtract is not None and subtract.numel() != x.numel():
        raise ValueError(f"subtract has {subtract.numel()} values, x has {x.numel()}")
    dtypes_ok = x.dtype in _FLOAT_DTYPES and (subtract is None or subtract.dtype in _FLOAT_DTYPES)
    if not (_on_gpu(x) and dtypes_ok and _supported_spec(spec)):
        return reference.quantize(x, spec, seed=seed, rotate=rotate, subtract=subtract)
    numel = x.numel()
    out = torch.empty(spec.wire_nbytes(numel), dtype=torch.uint8, device=x.device)
    flat = x.reshape(-1)
    sub = subtract.reshape(-1) if subtract is not None else None
    _launch_quantize(flat.view(1, 1, numel), sub, out, spec, seed, _log2_hadamard(spec, rotate, numel), tile_values,
                     num_warps)
    return Packed(out, spec, numel, x.shape, x.dtype)


def quantize_messages(x: torch.Tensor, spec: QuantSpec, *, seed: int | None = None,
                      tile_values: int = _TILE_VALUES, num_warps: int | None = None) -> torch.Tensor:
    reference.check_message_input(x)
    n, m = x.shape[0], x[0].numel()
    if not (_on_gpu(x) and x.dtype in _FLOAT_DTYPES and _supported_spec(spec)):
        return reference.quantize_messages(x, spec, seed=seed)
    _check_message_numel(spec, m)
    pieces = x.unsqueeze(1) if x.dim() == 2 else x  # [n, k, c]: message i is pieces i, 0..k-1
    if pieces.stride(2) != 1 or (pieces.shape[1] > 1 and pieces.shape[2] % spec.group_size):
        # strided values, or a group that would straddle two pieces: gather the messages first
        pieces = x.reshape(n, 1, m).contiguous()
    out = torch.empty(n, spec.wire_nbytes(m), dtype=torch.uint8, device=x.device)
    _launch_quantize(pieces, None, out, spec, seed, _log2_hadamard(spec, True, m), tile_values, num_warps)
    return out


def _launch_quantize(x: torch.Tensor, sub: torch.Tensor | None, out: torch.Tensor, spec: QuantSpec,
                     seed: int | None, log2_h: int, tile_values: int, num_warps: int | None) -> None:
    """x [n, k, c] (unit stride along c; c whole groups when k > 1) -> n wire buffers of k * c
    values in out ([n, wire] or 1-D for n = 1). sub: flat like x, for n = k = 1 only."""
    n, pieces, numel = x.shape
    groups = spec.num_groups(numel)
    bg, warps = launch_config(spec.group_size, tile_values, num_warps, runs=log2_h > 0)
    seed = reference.resolve_seed(seed) if spec.rounding == "stochastic" else 0
    if groups and n and pieces:
        _quantize_kernel[(triton.cdiv(groups, bg), pieces, n)](
            x, x if sub is None else sub, out, numel, groups, spec.payload_nbytes(pieces * numel), seed,
            spec.wire_nbytes(pieces * numel), x.stride(0), x.stride(1) if pieces > 1 else 0, pieces,
            BG=bg, GS=spec.group_size, BITS=spec.bits, SYMMETRIC=spec.symmetric,
            STOCHASTIC=spec.rounding == "stochastic", LOG2_H=log2_h, HAS_SUB=sub is not None,
            VEC=min(16 // x.element_size(), spec.group_size, _RUN.value), PIECES=pieces > 1, num_warps=warps,
            enable_fp_fusion=False,
        )


def _aligned_rows(chunks: torch.Tensor) -> torch.Tensor:
    # the kernels read scales as bf16: every row must start at an even address (a fresh copy does:
    # allocations are aligned and supported specs have an even wire size)
    if chunks.stride(1) == 1 and chunks.data_ptr() % 2 == 0 and chunks.stride(0) % 2 == 0:
        return chunks
    return chunks.clone(memory_format=torch.contiguous_format)


def _decode_into(chunks: torch.Tensor, spec: QuantSpec, numel: int, out: torch.Tensor, accumulate: bool,
                 rotate: bool, tile_values: int, num_warps: int | None, divisor: int = 1,
                 separate_rows: bool = False) -> None:
    """Sum the decoded rows of chunks into out; separate_rows: decode row r into out[r*numel:] instead."""
    log2_h = _log2_hadamard(spec, rotate, numel)
    chunks = _aligned_rows(chunks)
    groups = spec.num_groups(numel)
    W, rows = (1, chunks.shape[0]) if separate_rows else (chunks.shape[0], 1)
    run = _decode_run(spec, W)
    bg, warps = launch_config(spec.group_size, tile_values, num_warps, runs=run > 0)
    if groups:
        _dequantize_sum_kernel[(triton.cdiv(groups, bg), rows)](
            chunks, chunks.stride(0), W, out, numel, groups, spec.payload_nbytes(numel),
            reference.fp32_reciprocal(divisor),
            BG=bg, GS=spec.group_size, BITS=spec.bits, SYMMETRIC=spec.symmetric, LOG2_H=log2_h,
            ACCUMULATE=accumulate, SCALE=divisor != 1, RUN=run, num_warps=warps, enable_fp_fusion=False,
            **_unroll(W),
        )


def _decode_run(spec: QuantSpec, W: int) -> int:
    """Values per thread run for dequantize_sum (0: group rows). Runs only for sums of two chunks: on the
    H200 they won every W = 2 row by 1.06-1.08x and lost rows at W = 4 / 8 (docs/kernels.md)."""
    return min(spec.group_size, _RUN.value) if W == 2 else 0


def _resolve_out(out: torch.Tensor | None, numel: int, shape: torch.Size, dtype: torch.dtype,
                 accumulate: bool, device: torch.device) -> torch.Tensor:
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` tensor to add into")
        return torch.empty(shape, dtype=dtype, device=device)
    if out.numel() != numel:
        raise ValueError(f"out has {out.numel()} values, the packed data holds {numel}")
    return out


def _out_supported(out: torch.Tensor | None, dtype: torch.dtype) -> bool:
    if out is None:
        return dtype in _FLOAT_DTYPES
    return _on_gpu(out) and out.dtype in _FLOAT_DTYPES and out.is_contiguous()


def dequantize(
    packed: Packed,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    rotate: bool = True,
    tile_values: int = _TILE_VALUES,
    num_warps: int | None = None,
) -> torch.Tensor:
    spec = packed.spec
    if not (_on_gpu(packed.data) and _supported_spec(spec) and _out_supported(out, packed.dtype)):
        return reference.dequantize(packed, out=out, accumulate=accumulate, rotate=rotate)
    result = _resolve_out(out, packed.numel, packed.shape, packed.dtype, accumulate, packed.data.device)
    _decode_into(packed.data.view(1, -1), spec, packed.numel, result, accumulate, rotate, tile_values, num_warps)
    return result


def dequantize_messages(messages: torch.Tensor, spec: QuantSpec, m: int, *, out: torch.Tensor | None = None,
                        accumulate: bool = False, rotate: bool = True, tile_values: int = _TILE_VALUES,
                        num_warps: int | None = None) -> torch.Tensor:
    reference._check_chunks(messages, spec, m)
    _check_message_numel(spec, m)
    n = messages.shape[0]
    if not (_on_gpu(messages) and _supported_spec(spec) and _out_supported(out, torch.float32)):
        return reference.dequantize_messages(messages, spec, m, out=out, accumulate=accumulate, rotate=rotate)
    result = _resolve_out(out, n * m, torch.Size([n, m]), torch.float32, accumulate, messages.device)
    _decode_into(messages, spec, m, result, accumulate, rotate, tile_values, num_warps, separate_rows=True)
    return result


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
    tile_values: int = _TILE_VALUES,
    num_warps: int | None = None,
) -> torch.Tensor:
    reference._check_chunks(chunks, spec, numel)
    reference._check_divisor(divisor)
    if not (_on_gpu(chunks) and _supported_spec(spec) and _out_supported(out, dtype)):
        return reference.dequantize_sum(chunks, spec, numel, dtype=dtype, out=out, accumulate=accumulate,
                                        rotate=rotate, divisor=divisor)
    result = _resolve_out(out, numel, torch.Size([numel]), dtype, accumulate, chunks.device)
    _decode_into(chunks, spec, numel, result, accumulate, rotate, tile_values, num_warps, divisor)
    return result


def reduce_requantize(
    chunks: torch.Tensor,
    in_spec: QuantSpec,
    numel: int,
    out_spec: QuantSpec,
    *,
    seed: int | None = None,
    tile_values: int = _TILE_VALUES,
    num_warps: int | None = None,
) -> Packed:
    _check_same_rotation(in_spec, out_spec)
    reference._check_chunks(chunks, in_spec, numel)
    if not (_on_gpu(chunks) and _supported_spec(in_spec) and _supported_spec(out_spec)):
        return reference.reduce_requantize(chunks, in_spec, numel, out_spec, seed=seed)
    out = _reduce_requantize_into(chunks, in_spec, 1, numel, out_spec, seed, tile_values, num_warps)
    return Packed(out.view(-1), out_spec, numel, torch.Size([numel]), torch.float32)


def reduce_requantize_messages(chunks: torch.Tensor, in_spec: QuantSpec, n: int, m: int, out_spec: QuantSpec, *,
                               seed: int | None = None, tile_values: int = _TILE_VALUES,
                               num_warps: int | None = None) -> torch.Tensor:
    _check_same_rotation(in_spec, out_spec)
    reference._check_chunks(chunks, in_spec, n * m)
    _check_message_numel(out_spec, m)
    if not (_on_gpu(chunks) and _supported_spec(in_spec) and _supported_spec(out_spec)):
        return reference.reduce_requantize_messages(chunks, in_spec, n, m, out_spec, seed=seed)
    return _reduce_requantize_into(chunks, in_spec, n, m, out_spec, seed, tile_values, num_warps)


def _check_same_rotation(in_spec: QuantSpec, out_spec: QuantSpec) -> None:
    if in_spec.hadamard != out_spec.hadamard:
        raise ValueError(
            f"reduce_requantize keeps the rotated domain: in_spec.hadamard ({in_spec.hadamard}) "
            f"must equal out_spec.hadamard ({out_spec.hadamard})"
        )


def _reduce_requantize_into(chunks: torch.Tensor, in_spec: QuantSpec, n: int, m: int, out_spec: QuantSpec,
                            seed: int | None, tile_values: int, num_warps: int | None) -> torch.Tensor:
    """The sum of the W chunks (n * m values), requantized as n messages of m values -> [n, wire(m)]
    (m need not be whole groups when n = 1)."""
    numel = n * m
    out = torch.empty(n, out_spec.wire_nbytes(m), dtype=torch.uint8, device=chunks.device)
    if in_spec.group_size != out_spec.group_size:  # tiles differ: two passes, still on the GPU
        total = dequantize_sum(chunks, in_spec, numel, rotate=False)
        _launch_quantize(total.view(n, 1, m), None, out, out_spec, seed, _log2_hadamard(out_spec, False, numel),
                         tile_values, num_warps)
        return out
    if in_spec.hadamard:
        reference._check_whole_blocks(numel, in_spec)
    chunks = _aligned_rows(chunks)
    groups = in_spec.num_groups(numel)
    bg, warps = launch_config(in_spec.group_size, tile_values, num_warps, runs=True)
    seed = reference.resolve_seed(seed) if out_spec.rounding == "stochastic" else 0
    W, msg_groups = chunks.shape[0], out_spec.num_groups(m)
    if groups:
        _reduce_requantize_kernel[(triton.cdiv(msg_groups, bg), n)](
            chunks, chunks.stride(0), W, out, numel, groups, in_spec.payload_nbytes(numel),
            out_spec.payload_nbytes(m), seed, msg_groups, out.stride(0),
            BG=bg, GS=in_spec.group_size, IN_BITS=in_spec.bits, IN_SYMMETRIC=in_spec.symmetric,
            OUT_BITS=out_spec.bits, OUT_SYMMETRIC=out_spec.symmetric,
            STOCHASTIC=out_spec.rounding == "stochastic", PADDED=numel % in_spec.group_size != 0,
            MESSAGES=n > 1, num_warps=warps, enable_fp_fusion=False, **_unroll(W),
        )
    return out
