"""Compressed collectives: all-gather, reduce-scatter and the two-level reduce-scatter.

Each collective = pure codec steps (no communication; exported so that `engine/virtual.py` can run
W ranks in one process with exactly the same math) + one or two torch.distributed calls.

Layout. A reduce-scatter splits the 1-D input of N values into W chunks of c = ceil(N / W) values
(zeros pad the tail); rank r = node * L + local_rank gets chunk r, exactly as reduce_scatter_tensor
on the zero-padded input. On the wire every chunk is padded further to whole groups of the spec
(`spec.padded_numel(c)`), so all W chunks are quantized by one codec call without a group (or
Hadamard block) straddling two chunks; the padding is dropped on decode and the result has c values.

Seeds. `seed` is the caller's base seed for stochastic rounding; each rank and hop quantizes with
`rank_seed(seed, rank, hop)`, so ranks draw independent noise and a rerun is bit-identical. With
seed None a base seed is drawn from torch's global RNG.

Backends. spec None runs torch's own all_gather_into_tensor / reduce_scatter_tensor in the input
dtype. op "avg" uses ReduceOp.AVG on NCCL; elsewhere (gloo) it sums and divides by W, and a gloo
without reduce_scatter_tensor (older torch) falls back to all_reduce + taking the own chunk.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from halfbyte import quant
from halfbyte.comm import timing
from halfbyte.comm.accounting import chunk_numel
from halfbyte.comm.topology import Topology
from halfbyte.quant import QuantSpec

ReduceOpName = Literal["avg", "sum"]

# Hop ids mixed into the per-rank seed: every quantization in a collective draws its own noise.
HOP_ALL_GATHER = 1
HOP_REDUCE_SCATTER = 2
HOP_INTRA = 3
HOP_INTER = 4

_MASK64 = (1 << 64) - 1

# torch >= 2.12 renames the tensor collectives (*_single) and deprecates the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor_op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def mix_seed(*values: int) -> int:
    """A seed < 2**62 (valid for torch.Generator) hashed from integers by chained splitmix64: distinct
    inputs give distinct seeds with overwhelming probability."""
    h = 0
    for v in values:
        x = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = x ^ (x >> 31)
    return h >> 2


def rank_seed(seed: int | None, rank: int, hop: int) -> int | None:
    """Seed of one rank's quantization in one hop, derived from the collective's base seed."""
    return None if seed is None else mix_seed(seed, rank, hop)


def _base_seed(seed: int | None, *specs: QuantSpec | None) -> int | None:
    if seed is None and any(s is not None and s.rounding == "stochastic" for s in specs):
        return int(torch.randint(0, 2**62, (1,)).item())
    return seed


# ---- pure codec steps (no communication) ------------------------------------------------------
def pack_messages(x: torch.Tensor, spec: QuantSpec, *, seed: int | None) -> torch.Tensor:
    """Quantize the rows of x in one codec call -> [n, wire_nbytes(m)]: x is [n, m] (m whole
    groups), or a view [n, k, c] whose message i is the k pieces x[i, 0], ..., x[i, k-1] in order
    (any strides: the codec reads them in place, no layout copy)."""
    with timing.region("codec", "pack_messages"):
        return quant.quantize_messages(x, spec, seed=seed)


def split_chunks(full: torch.Tensor, world: int, chunk_pad: int) -> torch.Tensor:
    """1-D input -> [W, chunk_pad]: row r is chunk r (ceil(N/W) values) followed by zeros."""
    flat = full.reshape(-1)
    c = chunk_numel(flat.numel(), world)
    if flat.numel() == world * c and chunk_pad == c:
        return flat.view(world, c)  # the engine's aligned buckets: no copy
    x = F.pad(flat, (0, world * c - flat.numel())).view(world, c)
    return F.pad(x, (0, chunk_pad - c)) if chunk_pad > c else x


def encode_chunks(full: torch.Tensor, spec: QuantSpec, world: int, seed: int | None) -> torch.Tensor:
    """One-level reduce-scatter, send side: chunk r of `full` quantized -> uint8 [W, wire(c)]."""
    with timing.region("codec", "encode_chunks"):
        c = chunk_numel(full.numel(), world)
        return pack_messages(split_chunks(full, world, spec.padded_numel(c)), spec, seed=seed)


def decode_chunks(messages: torch.Tensor, spec: QuantSpec, numel: int) -> torch.Tensor:
    """Inverse of `encode_chunks` without the reduction: what the receivers decode from one rank's
    messages, laid back out as its `numel` values (the quantized input, e.g. for error feedback)."""
    with timing.region("codec", "decode_chunks"):
        c = chunk_numel(numel, messages.shape[0])
        return quant.dequantize_messages(messages, spec, spec.padded_numel(c))[:, :c].reshape(-1)[:numel]


def decode_sum(received: torch.Tensor, spec: QuantSpec, chunk: int, world: int, *,
               op: ReduceOpName = "avg", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reduce-scatter, receive side: sum the decoded chunks (fp32, Hadamard undone), /W for avg,
    drop the padding -> `chunk` values in out_dtype (one codec pass: the average and the cast are
    fused into the decode)."""
    with timing.region("codec", "decode_sum"):
        return quant.dequantize_sum(received, spec, spec.padded_numel(chunk), dtype=out_dtype,
                                    divisor=world if op == "avg" else 1)[:chunk]


def encode_two_level(full: torch.Tensor, intra_spec: QuantSpec, inter_spec: QuantSpec,
                     nodes: int, gpus_per_node: int, seed: int | None) -> torch.Tensor:
    """Two-level, send side: the message to local peer l holds chunks m*L + l of every node m
    (each padded to whole inter_spec groups), quantized with intra_spec -> uint8 [L, wire(M*cp)].
    The chunks are read where they lie (a [L, M, cp] view), not gathered into messages first."""
    with timing.region("codec", "encode_two_level"):
        M, L = nodes, gpus_per_node
        cp = inter_spec.padded_numel(chunk_numel(full.numel(), M * L))
        return pack_messages(split_chunks(full, M * L, cp).view(M, L, cp).transpose(0, 1), intra_spec, seed=seed)


def middle_hop(received: torch.Tensor, intra_spec: QuantSpec, inter_spec: QuantSpec, nodes: int,
               chunk_pad: int, seed: int | None) -> torch.Tensor:
    """Two-level, between the hops: sum the L node peers' messages and requantize with inter_spec,
    staying in the Hadamard domain -> uint8 [M, wire(chunk_pad)], row m for node m (the codec
    writes the messages in place: no layout pass after it)."""
    with timing.region("codec", "middle_hop"):
        return quant.reduce_requantize_messages(received, intra_spec, nodes, chunk_pad, inter_spec, seed=seed)


def encode_shard(shard: torch.Tensor, spec: QuantSpec, seed: int | None,
                 subtract: torch.Tensor | None = None) -> torch.Tensor:
    """All-gather, send side: the wire bytes (1-D uint8) of the shard, or of shard - subtract (qWD:
    the codec fuses the difference)."""
    with timing.region("codec", "encode_shard"):
        return quant.quantize(shard.reshape(-1), spec, seed=seed, subtract=subtract).data


def decode_gathered(received: torch.Tensor, spec: QuantSpec, shard_numel: int, out: torch.Tensor,
                    *, accumulate: bool = False) -> torch.Tensor:
    """All-gather, receive side: decode the W shards ([W, wire(s)]) into `out` (W*s values),
    adding to it when accumulate (qWD)."""
    with timing.region("codec", "decode_gathered"):
        W, s = received.shape[0], shard_numel
        sp = spec.padded_numel(s)
        flat = out.view(-1)
        if sp == s:  # group-aligned shards decode straight into out (the engine's case)
            quant.dequantize_messages(received, spec, s, out=flat, accumulate=accumulate)
            return out
        values = quant.dequantize_messages(received, spec, sp)[:, :s]
        if accumulate:
            flat.view(W, s).add_(values)
        else:
            flat.view(W, s).copy_(values)
        return out


# ---- communication ------------------------------------------------------------------------------
class CommHandle:
    """Returned by async collectives: `wait()` waits for the transfer, finishes decoding and returns
    the result (repeated calls return the same tensor)."""

    def __init__(self, work: dist.Work | None, finish: Callable[[], torch.Tensor]):
        self._work, self._finish = work, finish
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            with timing.region("wait", "comm"):
                if self._work is not None:
                    self._work.wait()
                self._result = self._finish()
        return self._result


def _done(handle: CommHandle, async_op: bool) -> CommHandle | torch.Tensor:
    return handle if async_op else handle.wait()


def _sent(topo: Topology, message_nbytes: int, peers_group: str = "world") -> dict[str, int]:
    """Bytes sent when one message goes to every other member of the world/intra/inter group."""
    M, L = topo.nodes, topo.gpus_per_node
    intra = (L - 1) * message_nbytes if peers_group in ("world", "intra") else 0
    inter = (M - 1) * (L if peers_group == "world" else 1) * message_nbytes if peers_group != "intra" else 0
    return {"intra": intra, "inter": inter}


def _check_op(op: str) -> None:
    if op not in ("avg", "sum"):
        raise ValueError(f"op must be 'avg' or 'sum', got {op!r}")


def _check_float(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


_gloo_has_reduce_scatter_tensor: bool | None = None


def _reduce_scatter_tensor(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup,
                           rank: int) -> dist.Work | None:
    """reduce_scatter_tensor (SUM), or all_reduce + own chunk where the backend lacks it."""
    global _gloo_has_reduce_scatter_tensor
    is_gloo = dist.get_backend(group) == "gloo"
    if not is_gloo or _gloo_has_reduce_scatter_tensor is not False:
        try:
            work = _reduce_scatter_tensor_op(out, inp, group=group, async_op=True)
            if is_gloo:
                _gloo_has_reduce_scatter_tensor = True
            return work
        except (RuntimeError, NotImplementedError):
            if not is_gloo or _gloo_has_reduce_scatter_tensor:
                raise
            _gloo_has_reduce_scatter_tensor = False
    total = inp.clone()
    dist.all_reduce(total, group=group)
    out.copy_(total.view(-1, out.numel())[rank])
    return None


def reduce_scatter_q(full: torch.Tensor, spec: QuantSpec | None, topo: Topology, *,
                     op: ReduceOpName = "avg", out_dtype: torch.dtype | None = None,
                     seed: int | None = None, async_op: bool = False) -> torch.Tensor | CommHandle:
    """Sum (avg) `full` over all ranks and return this rank's chunk (ceil(N/W) values).

    spec None: reduce_scatter_tensor in full's dtype. Else each chunk is quantized, exchanged by one
    all_to_all_single, decoded and summed in fp32. out_dtype: result dtype (default full's dtype).
    """
    _check_op(op)
    _check_float(full, "full")
    W, rank = topo.world_size, topo.rank
    c = chunk_numel(full.numel(), W)
    out_dtype = out_dtype or full.dtype
    baseline = _sent(topo, c * full.element_size())
    if spec is None:
        inp = split_chunks(full, W, c).reshape(-1)
        out = torch.empty(c, dtype=full.dtype, device=full.device)
        native_avg = op == "avg" and dist.get_backend(topo.world_group) == "nccl"
        if native_avg:
            work = _reduce_scatter_tensor_op(out, inp, op=dist.ReduceOp.AVG, group=topo.world_group,
                                             async_op=True)
        else:
            work = _reduce_scatter_tensor(out, inp, topo.world_group, rank)

        def finish() -> torch.Tensor:
            result = out.div_(W) if op == "avg" and not native_avg else out
            return result.to(out_dtype)

        topo.stats.record("reduce_scatter", baseline, baseline)
        return _done(CommHandle(work, finish), async_op)

    send = encode_chunks(full, spec, W, rank_seed(_base_seed(seed, spec), rank, HOP_REDUCE_SCATTER))
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=topo.world_group, async_op=True)
    topo.stats.record("reduce_scatter", _sent(topo, send.shape[1]), baseline)
    return _done(CommHandle(work, lambda: decode_sum(recv, spec, c, W, op=op, out_dtype=out_dtype)),
                 async_op)


def reduce_scatter_two_level(full: torch.Tensor, intra_spec: QuantSpec, inter_spec: QuantSpec,
                             topo: Topology, *, op: ReduceOpName = "avg",
                             out_dtype: torch.dtype | None = None, seed: int | None = None,
                             async_op: bool = False) -> torch.Tensor | CommHandle:
    """Reduce-scatter in two hops: intra_spec all-to-all inside the node, then inter_spec all-to-all
    between nodes. Same result layout as reduce_scatter_q. intra_spec.hadamard must equal
    inter_spec.hadamard: the rotation is applied before the first quantization and undone after the
    last one. With one rank per node there is no intra hop (inter_spec directly).

    Async: on NCCL the middle hop and the inter hop are queued at once (stream-ordered, the host
    does not block); on gloo `wait()` runs them.
    """
    _check_op(op)
    _check_float(full, "full")
    M, L, W = topo.nodes, topo.gpus_per_node, topo.world_size
    if M < 2:
        raise ValueError(f"reduce_scatter_two_level needs >= 2 nodes, the topology has 1 node of {L} "
                         "ranks: use reduce_scatter_q (one level) on a single node")
    if intra_spec.hadamard != inter_spec.hadamard:
        raise ValueError(f"intra_spec.hadamard ({intra_spec.hadamard}) must equal inter_spec.hadamard "
                         f"({inter_spec.hadamard}): the middle hop stays in the rotated domain")
    c = chunk_numel(full.numel(), W)
    cp = inter_spec.padded_numel(c)
    out_dtype = out_dtype or full.dtype
    base = _base_seed(seed, intra_spec, inter_spec)
    baseline = _sent(topo, c * full.element_size())

    def launch_inter(send: torch.Tensor) -> CommHandle:
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=topo.inter_group, async_op=True)
        return CommHandle(work, lambda: decode_sum(recv, inter_spec, c, W, op=op, out_dtype=out_dtype))

    if L == 1:
        send = pack_messages(split_chunks(full, W, cp), inter_spec, seed=rank_seed(base, topo.rank, HOP_INTER))
        topo.stats.record("reduce_scatter_two_level", _sent(topo, send.shape[1], "inter"), baseline)
        return _done(launch_inter(send), async_op)

    send = encode_two_level(full, intra_spec, inter_spec, M, L, rank_seed(base, topo.rank, HOP_INTRA))
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=topo.intra_group, async_op=True)

    def middle_and_inter() -> CommHandle:
        work.wait()
        middle = middle_hop(recv, intra_spec, inter_spec, M, cp, rank_seed(base, topo.rank, HOP_INTER))
        topo.stats.record("reduce_scatter_two_level",
                          {"intra": (L - 1) * send.shape[1], "inter": (M - 1) * middle.shape[1]},
                          baseline)
        return launch_inter(middle)

    if _stream_ordered(topo.intra_group):
        # NCCL's wait() orders the current stream after the intra-node transfer without blocking
        # the host: chain the middle hop and the slow inter-node all-to-all now, so the inter hop
        # overlaps the rest of backward. The compute stream does wait for the (fast, NVLink) intra
        # hop here; moving the middle hop to a side stream would hide that too (not done yet).
        return _done(middle_and_inter(), async_op)
    # Elsewhere (gloo) wait() blocks the host: defer both hops to the caller's wait().
    return _done(CommHandle(None, lambda: middle_and_inter().wait()), async_op)


def _stream_ordered(group: dist.ProcessGroup) -> bool:
    """True when Work.wait() is a device-stream dependency rather than a host block."""
    return dist.get_backend(group) == "nccl"


def all_gather_q(shard: torch.Tensor, spec: QuantSpec | None, topo: Topology, *,
                 out: torch.Tensor | None = None, accumulate: bool = False, seed: int | None = None,
                 subtract: torch.Tensor | None = None,
                 async_op: bool = False) -> torch.Tensor | CommHandle:
    """Gather every rank's shard (equal sizes) into `out` (W * shard.numel() values, rank order);
    accumulate=True adds the gathered values into `out` (qWD). spec None: all_gather_into_tensor in
    the shard's dtype; else each rank's shard travels quantized and every rank (the owner included)
    decodes the same bytes. subtract (quantized specs only): send shard - subtract instead, fused
    into the codec (qWD sends master - replica shard). Returns out (a new 1-D tensor of shard's
    dtype when not given)."""
    _check_float(shard, "shard")
    W, s = topo.world_size, shard.numel()
    if out is None:
        if accumulate:
            raise ValueError("all_gather_q: accumulate=True needs an `out` tensor to add into")
        out = torch.empty(W * s, dtype=shard.dtype, device=shard.device)
    elif out.numel() != W * s:
        raise ValueError(f"all_gather_q: out has {out.numel()} values, expected world_size * "
                         f"shard.numel() = {W} * {s} = {W * s}")
    baseline = _sent(topo, s * out.element_size())  # uncompressed = a gather in out's dtype
    if spec is None:
        if subtract is not None:
            raise ValueError("all_gather_q: subtract is fused into the codec and needs a spec")
        direct = not accumulate and out.dtype == shard.dtype and out.is_contiguous()
        buf = out.view(-1) if direct else torch.empty(W * s, dtype=shard.dtype, device=shard.device)
        work = _all_gather_tensor(buf, shard.reshape(-1).contiguous(), group=topo.world_group,
                                  async_op=True)

        def finish() -> torch.Tensor:
            if not direct:
                (out.view(-1).add_ if accumulate else out.view(-1).copy_)(buf)
            return out

        topo.stats.record("all_gather", baseline, baseline)
        return _done(CommHandle(work, finish), async_op)

    send = encode_shard(shard, spec, rank_seed(_base_seed(seed, spec), topo.rank, HOP_ALL_GATHER),
                        subtract)
    recv = torch.empty(W, send.numel(), dtype=torch.uint8, device=send.device)
    work = _all_gather_tensor(recv.view(-1), send, group=topo.world_group, async_op=True)
    topo.stats.record("all_gather", _sent(topo, send.numel()), baseline)
    return _done(CommHandle(work, lambda: decode_gathered(recv, spec, s, out, accumulate=accumulate)),
                 async_op)
