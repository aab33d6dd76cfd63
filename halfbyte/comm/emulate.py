"""The collectives of `halfbyte.comm.collectives` replayed for W ranks in one process.

Each function takes every rank's input and returns every rank's result, computed by the same pure
codec steps with the same per-rank seeds (`rank_seed(seed, rank, hop)`) as the real collectives, so
the results are bit-identical to what W real ranks get (for the quantized paths; the uncompressed
sum adds ranks in rank order, where a backend picks its own order). They keep every message, so
they cost W times the memory of one rank: the virtual-rank gradient path, which must not grow with
W, uses running sums instead (`halfbyte.engine.world.VirtualWorld`) and the tests compare the two.

`stats`, when given, records what the W ranks send together (each rank's bytes, as the real
collective records them on that rank, summed over the ranks).
"""

from __future__ import annotations

import torch

from halfbyte.comm.accounting import (
    CommStats,
    all_gather_bytes,
    chunk_numel,
    reduce_scatter_bytes,
    reduce_scatter_two_level_bytes,
)
from halfbyte.comm.collectives import (
    HOP_ALL_GATHER,
    HOP_INTER,
    HOP_INTRA,
    HOP_REDUCE_SCATTER,
    ReduceOpName,
    decode_gathered,
    decode_sum,
    encode_chunks,
    encode_shard,
    encode_two_level,
    middle_hop,
    pack_messages,
    rank_seed,
    split_chunks,
)
from halfbyte.quant import QuantSpec


def _record(stats: CommStats | None, op: str, per_rank: dict[str, int], baseline: dict[str, int],
            world: int) -> None:
    if stats is not None:
        stats.record(op, {k: v * world for k, v in per_rank.items()},
                     {k: v * world for k, v in baseline.items()}, calls=world)


def all_gather(shards: list[torch.Tensor], spec: QuantSpec | None, seed: int | None, out: torch.Tensor, *,
               nodes: int, accumulate: bool = False, subtract: list[torch.Tensor] | None = None,
               stats: CommStats | None = None) -> torch.Tensor:
    """`all_gather_q` of W ranks: rank r's `shards[r]` (minus `subtract[r]` for qWD) into `out`
    (W * shard values, the same for every rank, so one `out` stands for all of them)."""
    W, s = len(shards), shards[0].numel()
    L = W // nodes
    flat = out.view(-1)
    baseline = all_gather_bytes(s, out.element_size(), nodes, L)
    if spec is None:
        for r, shard in enumerate(shards):
            part = flat[r * s:(r + 1) * s]
            part.add_(shard.reshape(-1)) if accumulate else part.copy_(shard.reshape(-1))
        _record(stats, "all_gather", baseline, baseline, W)
        return out
    sends = torch.stack([encode_shard(shard, spec, rank_seed(seed, r, HOP_ALL_GATHER),
                                      None if subtract is None else subtract[r])
                         for r, shard in enumerate(shards)])
    decode_gathered(sends, spec, s, out, accumulate=accumulate)
    _record(stats, "all_gather", all_gather_bytes(s, spec, nodes, L), baseline, W)
    return out


def reduce_scatter(inputs: list[torch.Tensor], spec: QuantSpec | None, seed: int | None, *, nodes: int,
                   op: ReduceOpName = "avg", out_dtype: torch.dtype | None = None,
                   stats: CommStats | None = None) -> list[torch.Tensor]:
    """`reduce_scatter_q` of W ranks: the sum (mean) of the inputs, chunk r for rank r. Uncompressed,
    the ranks are added in rank order and the mean is taken in the input dtype (as gloo does)."""
    W, n = len(inputs), inputs[0].numel()
    c = chunk_numel(n, W)
    dtype = out_dtype or inputs[0].dtype
    baseline = reduce_scatter_bytes(n, inputs[0].element_size(), nodes, W // nodes)
    if spec is None:
        total = split_chunks(inputs[0], W, c).clone()
        for x in inputs[1:]:
            total += split_chunks(x, W, c)
        if op == "avg":
            total.div_(W)
        _record(stats, "reduce_scatter", baseline, baseline, W)
        return list(total.to(dtype))
    sends = [encode_chunks(x, spec, W, rank_seed(seed, r, HOP_REDUCE_SCATTER)) for r, x in enumerate(inputs)]
    _record(stats, "reduce_scatter", reduce_scatter_bytes(n, spec, nodes, W // nodes), baseline, W)
    return [decode_sum(torch.stack([send[r] for send in sends]), spec, c, W, op=op, out_dtype=dtype)
            for r in range(W)]


def reduce_scatter_two_level(inputs: list[torch.Tensor], intra_spec: QuantSpec, inter_spec: QuantSpec,
                             seed: int | None, *, nodes: int, op: ReduceOpName = "avg",
                             out_dtype: torch.dtype | None = None,
                             stats: CommStats | None = None) -> list[torch.Tensor]:
    """`reduce_scatter_two_level` of W = nodes * L ranks: the intra-node messages, each rank's
    middle hop over the L messages it receives, then the inter-node messages; chunk r for rank r."""
    M, W, n = nodes, len(inputs), inputs[0].numel()
    L = W // M
    c = chunk_numel(n, W)
    cp = inter_spec.padded_numel(c)
    dtype = out_dtype or inputs[0].dtype
    if L == 1:  # no intra hop: the inter-node messages directly
        middles = [pack_messages(split_chunks(x, W, cp), inter_spec, seed=rank_seed(seed, r, HOP_INTER))
                   for r, x in enumerate(inputs)]
    else:
        firsts = [encode_two_level(x, intra_spec, inter_spec, M, L, rank_seed(seed, r, HOP_INTRA))
                  for r, x in enumerate(inputs)]
        middles = []  # rank (node, local) receives message `local` of its L node peers
        for r in range(W):
            node, local = divmod(r, L)
            received = torch.stack([firsts[node * L + peer][local] for peer in range(L)])
            middles.append(middle_hop(received, intra_spec, inter_spec, M, cp, rank_seed(seed, r, HOP_INTER)))
    sent = reduce_scatter_two_level_bytes(n, intra_spec, inter_spec, M, L)
    _record(stats, "reduce_scatter_two_level", sent,
            reduce_scatter_bytes(n, inputs[0].element_size(), M, L), W)
    results = []  # rank (node, local) receives row `node` from the same local rank of every node
    for r in range(W):
        node, local = divmod(r, L)
        received = torch.stack([middles[m * L + local][node] for m in range(M)])
        results.append(decode_sum(received, inter_spec, c, W, op=op, out_dtype=dtype))
    return results
