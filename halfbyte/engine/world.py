"""Where the ranks of the sharded engine live: the one difference between real and virtual ranks.

`ShardedDataParallel` is written once over a `World`. A world is a layout of W = M nodes x L ranks
(global rank r = node * L + local_rank owns shard r of every bucket), the ranks this process plays
(`owned`), and the few operations that differ between real and virtual ranks:

  gradients  `reduce_scatter(bucket, seed)` starts this process's contribution to a bucket's
             gradient reduction; `gradient_shards(bucket)` returns the averaged fp32 shard of every
             owned rank; `discard_gradients()` drops a step that is never taken
  norm       `sum_over_ranks(partials)`: the global sum of the owned ranks' partial sums
  weights    `gather_weights(...)`: every rank's shard into the replica (full / direct / qwd)
  start-up   `broadcast_(tensors)` (rank 0's values everywhere), `agree(values)` (equal everywhere?)

ProcessGroupWorld: this process is one real rank of a torch.distributed job; the operations are
halfbyte.comm's collectives over a Topology, asynchronous where they can be.

VirtualWorld: this process plays all W ranks in order 0..W-1 (`begin_rank` / `end_rank`), with the
exact math of the collectives (halfbyte.comm.emulate, the same seeds per rank and hop). One replica
stands for all W (they are identical by construction). The gradient reduction keeps running sums
instead of every rank's messages, so memory does not grow with W: each rank's gradient is encoded
when its block ends and its decoded contribution added, in the order the collectives' receivers sum
(rank order within a group), so the sums are bit-identical to theirs:
  grads "full"       sum of the W gradients (fp32), then the mean rounded to the wire dtype
  grads "one-level"  per destination rank: sum of the W decoded chunks, kept in the Hadamard domain
  grads "two-level"  per node: sum of its L ranks' decoded intra-node messages; when the node's last
                     rank is in, each local peer's sum is requantized (inter spec, its own seed) and
                     decoded into the per-destination sum, one node after the other
What differs from real ranks in the last bit, by construction: the uncompressed gradient sum and the
all-reduce of the partial squared grad norms add ranks in rank order, where gloo and NCCL choose
their own order (exact for W <= 2; for W > 2 the last bit of the fp32 mean, or of the clip
coefficient when clipping is active).

`stats` counts the bytes sent by the ranks this process plays: one rank's for a process-group
world, all W ranks' together for a virtual world (every rank sends the same amount).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist

from halfbyte import quant
from halfbyte.comm import emulate
from halfbyte.comm.accounting import CommStats, reduce_scatter_bytes, reduce_scatter_two_level_bytes
from halfbyte.comm.collectives import (
    HOP_INTER,
    HOP_INTRA,
    HOP_REDUCE_SCATTER,
    all_gather_q,
    encode_chunks,
    encode_two_level,
    rank_seed,
    reduce_scatter_q,
    reduce_scatter_two_level,
)
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology, divisors
from halfbyte.engine.buffers import Bucket
from halfbyte.quant import QuantSpec


class World(ABC):
    """The ranks an engine runs on; see the module docstring."""

    nodes: int
    gpus_per_node: int
    device: torch.device
    stats: CommStats
    owned: tuple[int, ...]  # global ranks whose shards this process owns, in rank order
    leader: bool  # this process logs and writes what is written once
    # True when gradients are sent once a rank's `engine.as_rank(r)` block ends (virtual ranks);
    # False when backward hooks send each bucket as soon as it is complete (real ranks).
    defers_gradients: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @abstractmethod
    def describe(self) -> str: ...

    def setup(self, buckets: list[Bucket], comm: CommConfig) -> None:
        """Called once by the engine with its buckets and communication config."""
        self.buckets, self.comm = buckets, comm

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group a checkpoint is written with (None: this process alone)."""
        return None

    # ---- start-up and checks ------------------------------------------------------------------
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Give every rank the first rank's values (virtual ranks share them already)."""

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        """Per element of a 1-D int64 tensor: True where every process holds the same value."""
        return torch.ones_like(values, dtype=torch.bool)

    def barrier(self) -> None:
        """Wait until every process got here (e.g. after the leader wrote a file)."""

    def begin_rank(self, rank: int) -> None:
        """Enter `engine.as_rank(rank)`: backward passes inside are global rank `rank`'s."""

    def end_rank(self, rank: int, completed: bool) -> None:
        """Leave `engine.as_rank(rank)`; completed is False when the block raised."""

    def gradient_error(self) -> str | None:
        """Why a gradient may not arrive now (None: it may)."""
        return None

    def check_step(self) -> None:
        """Raise RuntimeError when step() is called before every owned rank's gradient is in."""

    # ---- the operations that differ ------------------------------------------------------------
    @abstractmethod
    def reduce_scatter(self, bucket: Bucket, seed: int) -> None: ...

    @abstractmethod
    def pending(self, bucket: Bucket) -> bool:
        """True when the bucket's reduction has started this step (a later gradient would be lost)."""

    @abstractmethod
    def gradient_shards(self, bucket: Bucket) -> list[torch.Tensor]: ...

    @abstractmethod
    def discard_gradients(self) -> None: ...

    @abstractmethod
    def sum_over_ranks(self, partials: list[torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def gather_weights(self, bucket: Bucket, masters: list[torch.Tensor], weights: str,
                       spec: QuantSpec | None, seed: int | None) -> Any:
        """Every rank's master shard into bucket.replica: "full" (cast), "direct" (quantized) or
        "qwd" (the quantized master - replica, added by every rank). Returns something with
        .wait() when the gather may still be in flight, else None."""

    @abstractmethod
    def all_gather(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The owned ranks' shards of one bucket -> the whole bucket, uncompressed, on every process
        (for exports; not counted in stats)."""

    def memory_report(self) -> dict[str, int]:
        """Bytes the world itself holds for the gradient reduction."""
        return {}


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ProcessGroupWorld(World):
    """This process is rank topo.rank of a torch.distributed job (Topology: nodes x L ranks)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.nodes, self.gpus_per_node = topo.nodes, topo.gpus_per_node
        self.device, self.stats = topo.device, topo.stats
        self.owned = (topo.rank,)
        self.leader = topo.rank == 0
        self._work: dict[int, Any] = {}

    def describe(self) -> str:
        return self.topo.describe()

    @property
    def process_group(self) -> dist.ProcessGroup:
        return self.topo.world_group

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        # group_src: the topology may be a sub-group (one island), whose first rank is not global 0
        for t in tensors:
            dist.broadcast(t, group_src=0, group=self.topo.world_group)

    def barrier(self) -> None:
        dist.barrier(group=self.topo.world_group)

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        both = torch.cat([values, -values]).to(self.device)  # max of (x, -x): max and -min at once
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.topo.world_group)
        n = values.numel()
        return (both[:n] == -both[n:]).cpu()

    def begin_rank(self, rank: int) -> None:
        if rank != self.topo.rank:
            raise ValueError(f"as_rank({rank}) on real rank {self.topo.rank}: a process of a "
                             "torch.distributed job only plays its own rank")

    def reduce_scatter(self, bucket: Bucket, seed: int) -> None:
        c, topo = self.comm, self.topo
        kw: dict[str, Any] = dict(op="avg", out_dtype=torch.float32, async_op=True)
        if c.grads == "two-level":
            work = reduce_scatter_two_level(bucket.grad, c.grad_intra_spec, c.grad_spec, topo, seed=seed, **kw)
        elif c.grads == "one-level":
            work = reduce_scatter_q(bucket.grad, c.grad_spec, topo, seed=seed, **kw)
        else:
            work = reduce_scatter_q(bucket.grad, None, topo, **kw)
        self._work[bucket.index] = work

    def pending(self, bucket: Bucket) -> bool:
        return bucket.index in self._work

    def gradient_shards(self, bucket: Bucket) -> list[torch.Tensor]:
        return [self._work.pop(bucket.index).wait()]

    def discard_gradients(self) -> None:
        for work in self._work.values():  # complete them: every rank runs the same collectives
            work.wait()
        self._work.clear()

    def sum_over_ranks(self, partials: list[torch.Tensor]) -> torch.Tensor:
        (total,) = partials
        dist.all_reduce(total, group=self.topo.world_group)
        return total

    def gather_weights(self, bucket: Bucket, masters: list[torch.Tensor], weights: str,
                       spec: QuantSpec | None, seed: int | None) -> Any:
        (master,) = masters
        kw: dict[str, Any] = dict(out=bucket.replica, async_op=True)
        if weights == "full":
            return all_gather_q(master.to(bucket.replica.dtype), None, self.topo, **kw)
        if weights == "direct":
            return all_gather_q(master, spec, self.topo, seed=seed, **kw)
        # qwd: every rank, the owner included, adds the same decoded delta
        return all_gather_q(master, spec, self.topo, accumulate=True, seed=seed,
                            subtract=bucket.shard(bucket.replica, self.topo.rank), **kw)

    def all_gather(self, shards: list[torch.Tensor]) -> torch.Tensor:
        (shard,) = shards
        uncounted = dataclasses.replace(self.topo, stats=CommStats())  # an export is not training traffic
        return all_gather_q(shard, None, uncounted)

    def memory_report(self) -> dict[str, int]:
        # the fp32 gradient shard each reduce-scatter returns: one master shard's size per bucket
        return {"grad_shards": sum(b.shard_numel * 4 for b in self.buckets)}


class VirtualWorld(World):
    """All `world_size` ranks (M = world_size / gpus_per_node nodes) in this process."""

    defers_gradients = True

    def __init__(self, world_size: int, gpus_per_node: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        L = world_size if gpus_per_node is None else gpus_per_node
        for name, value in (("world_size", world_size), ("gpus_per_node", L)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"virtual {name} must be a positive integer, got {value!r}")
        if world_size % L:
            raise ValueError(f"virtual gpus_per_node ({L}) must divide world_size ({world_size}): "
                             f"choose one of {divisors(world_size)}")
        self.nodes, self.gpus_per_node = world_size // L, L
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # what a model moved to "cuda" reports
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.stats = device, CommStats()
        self.owned = tuple(range(world_size))
        self.leader = True
        self._active: int | None = None  # the rank whose as_rank block is running
        self._next_rank = 0  # ranks contribute in order: the sums add them as the collectives do

    def describe(self) -> str:
        return (f"{self.world_size} virtual ranks: {self.nodes} node(s) x {self.gpus_per_node} "
                f"rank(s) per node, one process, {self.device}")

    def setup(self, buckets: list[Bucket], comm: CommConfig) -> None:
        super().setup(buckets, comm)
        L = self.gpus_per_node
        # Running sums, [W, chunk] per bucket in destination-rank order; two-level keeps them as
        # [L, M, chunk] (destinations of one local peer contiguous) plus a per-node [L, M * chunk].
        self._sums = [torch.empty(self._sum_shape(b), device=self.device) for b in buckets]
        self._node_sums = [torch.empty_like(s).view(L, -1) for s in self._sums] if self._two_hops else []

    # ---- rank order ----------------------------------------------------------------------------
    def begin_rank(self, rank: int) -> None:
        if self._active is not None:
            raise RuntimeError(f"as_rank({rank}) inside as_rank({self._active})")
        if rank != self._next_rank:
            raise ValueError(f"virtual ranks must contribute in order 0..{self.world_size - 1} once per "
                             f"step (the sums add them in the collectives' order): expected rank "
                             f"{self._next_rank}, got {rank}")
        self._active = rank

    def end_rank(self, rank: int, completed: bool) -> None:
        self._active = None
        if completed:
            self._next_rank += 1

    def gradient_error(self) -> str | None:
        if self._active is None:
            return "backward() outside engine.as_rank(r): on virtual ranks every gradient belongs to a rank"
        return None

    def check_step(self) -> None:
        if self._active is not None or self._next_rank != self.world_size:
            raise RuntimeError(f"step() needs the gradients of all {self.world_size} virtual ranks, "
                               f"got {self._next_rank} (use engine.as_rank(r) for r = 0..W-1)")

    # ---- gradients -----------------------------------------------------------------------------
    @property
    def _two_hops(self) -> bool:
        return self.comm.grads == "two-level" and self.gpus_per_node > 1

    def _chunk(self, b: Bucket) -> int:
        """Values per destination rank in the running sums: the shard, padded to whole groups of
        the spec the receivers decode (as the collectives pad their chunks)."""
        spec = self.comm.grad_spec
        return b.shard_numel if spec is None else spec.padded_numel(b.shard_numel)

    def _sum_shape(self, b: Bucket) -> tuple[int, ...]:
        M, L = self.nodes, self.gpus_per_node
        return (L, M, self._chunk(b)) if self._two_hops else (self.world_size, self._chunk(b))

    def pending(self, bucket: Bucket) -> bool:
        return False  # a rank's gradient is only sent when its block ends

    def reduce_scatter(self, bucket: Bucket, seed: int) -> None:
        """The active rank's gradient of the bucket: the first hop of its reduce-scatter, decoded and
        added to the receivers' running sums (and, after a node's last rank, the inter hop); then
        the gradient buffer is cleared for the next rank."""
        c, M, L, rank = self.comm, self.nodes, self.gpus_per_node, self._active
        total = self._sums[bucket.index]
        if c.grads == "full":
            flat = total.view(-1)
            flat.add_(bucket.grad) if rank else flat.copy_(bucket.grad)
        elif not self._two_hops:  # one level; two-level with L == 1 is its inter hop alone
            hop = HOP_REDUCE_SCATTER if c.grads == "one-level" else HOP_INTER
            send = encode_chunks(bucket.grad, c.grad_spec, self.world_size, rank_seed(seed, rank, hop))
            quant.dequantize_messages(send, c.grad_spec, self._chunk(bucket), out=total,
                                      accumulate=rank > 0, rotate=False)
        else:
            node, local = divmod(rank, L)
            node_sum = self._node_sums[bucket.index]
            send = encode_two_level(bucket.grad, c.grad_intra_spec, c.grad_spec, M, L,
                                    rank_seed(seed, rank, HOP_INTRA))
            quant.dequantize_messages(send, c.grad_intra_spec, node_sum.shape[1], out=node_sum,
                                      accumulate=local > 0, rotate=False)
            if local == L - 1:  # the node is complete: middle hop of each local peer, then inter hop
                for peer in range(L):
                    packed = quant.quantize(node_sum[peer], c.grad_spec, rotate=False,
                                            seed=rank_seed(seed, node * L + peer, HOP_INTER))
                    quant.dequantize(packed, out=total[peer].view(-1), accumulate=node > 0, rotate=False)
        if rank == self.world_size - 1:
            self._record_grads(bucket)
        bucket.grad.zero_()

    def gradient_shards(self, bucket: Bucket) -> list[torch.Tensor]:
        """The averaged fp32 gradient shard of every rank (what its reduce-scatter returns)."""
        W, s = self.world_size, bucket.shard_numel
        total = self._sums[bucket.index]
        if self.comm.grads == "full":  # the mean in the wire dtype, like out.div_(W) on gloo
            return list(total.view(-1).to(bucket.grad.dtype).div_(W).float().view(W, s))
        spec = self.comm.grad_spec
        if spec.hadamard:
            total = quant.fwht(total, spec.hadamard)
        if self._two_hops:  # [L, M, chunk] -> rank order r = node * L + local
            total = total.transpose(0, 1)
        return list(total.reshape(W, -1)[:, :s] * quant.fp32_reciprocal(W))  # as decode_sum averages

    def discard_gradients(self) -> None:
        if self._active is not None:
            raise RuntimeError(f"zero_grad() inside as_rank({self._active})")
        self._next_rank = 0  # rank 0 overwrites the sums next step

    def _record_grads(self, b: Bucket) -> None:
        c, M, L, W = self.comm, self.nodes, self.gpus_per_node, self.world_size
        n, elem = b.padded_numel, b.grad.element_size()
        baseline = {k: v * W for k, v in reduce_scatter_bytes(n, elem, M, L).items()}
        if c.grads == "two-level":
            sent = reduce_scatter_two_level_bytes(n, c.grad_intra_spec, c.grad_spec, M, L)
            op = "reduce_scatter_two_level"
        else:
            sent, op = reduce_scatter_bytes(n, c.grad_spec or elem, M, L), "reduce_scatter"
        self.stats.record(op, {k: v * W for k, v in sent.items()}, baseline, calls=W)

    def sum_over_ranks(self, partials: list[torch.Tensor]) -> torch.Tensor:
        total = partials[0]
        for p in partials[1:]:  # rank order
            total = total + p
        return total

    # ---- weights -------------------------------------------------------------------------------
    def gather_weights(self, bucket: Bucket, masters: list[torch.Tensor], weights: str,
                       spec: QuantSpec | None, seed: int | None) -> None:
        replica = bucket.replica
        shards = [bucket.shard(replica, r) for r in self.owned]
        emulate.all_gather(masters, None if weights == "full" else spec, seed, replica, nodes=self.nodes,
                           accumulate=weights == "qwd", subtract=shards if weights == "qwd" else None,
                           stats=self.stats)
        return None

    def all_gather(self, shards: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(shards)

    def memory_report(self) -> dict[str, int]:
        return {"grad_sums": _nbytes(self._sums), "node_sums": _nbytes(self._node_sums)}
