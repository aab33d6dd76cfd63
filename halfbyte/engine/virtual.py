"""Virtual ranks: one process plays W data-parallel ranks laid out as M nodes x L GPUs.

Each virtual rank's gradient comes from its own micro-batch; the engine then runs, rank by rank and
hop by hop, the same codec steps the collectives run (`halfbyte.comm.collectives`), with the same
seeds per (step, bucket, rank, hop), and the optimizer math of ShardedDataParallel on every rank's
shard. All replicas of the real engine are identical by construction, so one replica stands for
all of them. This is how convergence at any W is studied on one GPU.

Memory stays independent of W: each rank's gradient is encoded right after its backward and its
decoded contribution added to running fp32 sums, in the order the receivers of the collectives sum
(rank order within a group), so the sums are bit-identical to theirs:
  grads "full"       sum of the W gradients (fp32), then the mean rounded to the wire dtype
  grads "one-level"  per destination rank: sum of the W decoded chunks, kept in the Hadamard domain
  grads "two-level"  per node: sum of its L ranks' decoded intra-node messages; when the node's last
                     rank is in, each local peer's sum is requantized (inter spec, its own seed) and
                     decoded into the per-destination sum, one node after the other
step() undoes the Hadamard rotation, averages (times fp32_reciprocal(W), as decode_sum does) and
continues exactly like the real engine.

What is bit-identical to the real engine (same model, data and seeds; reference codecs; fp32): the
codec bytes and every compressed sum, hence the gradient shards, AdamW, the weight all-gathers
(full / direct / qWD) and the losses. Two reductions are the backend's choice in the real engine
and rank order here: the uncompressed gradient sum (gloo's ring adds chunk j starting at rank
j+2, NCCL has its own order; in bf16 NCCL also rounds at every hop) and the all-reduce of the W
partial squared grad norms. Both are exact for W <= 2 (a + b == b + a); for W > 2 they can differ
in the last bit, which reaches the weights only through the fp32 mean (grads "full") or the clip
coefficient (when clipping is active).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from halfbyte import quant
from halfbyte.comm import (
    HOP_ALL_GATHER,
    HOP_INTER,
    HOP_INTRA,
    HOP_REDUCE_SCATTER,
    all_gather_bytes,
    decode_gathered,
    divisors,
    encode_chunks,
    encode_shard,
    encode_two_level,
    rank_seed,
    reduce_scatter_bytes,
    reduce_scatter_two_level_bytes,
)
from halfbyte.comm.accounting import CommStats
from halfbyte.engine import checkpoint, seeds
from halfbyte.engine.buffers import Bucket, build_buckets, register_grad_ready_hooks
from halfbyte.comm.config import CommConfig
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.optim import adamw_, clip_
from halfbyte.engine.sharded import StepResult, validate_engine

STATE_FILE = "virtual.pt"


@dataclass
class VirtualTopology:
    """The M x L layout the virtual ranks emulate (no process groups). Global rank r = node * L +
    local_rank, as in halfbyte.comm.Topology. `stats` counts the bytes one real rank would send."""

    nodes: int
    gpus_per_node: int
    device: torch.device
    stats: CommStats = field(default_factory=CommStats)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.world_size} virtual ranks: {self.nodes} node(s) x {self.gpus_per_node} "
                f"rank(s) per node, one process, {self.device}")


class VirtualDataParallel:
    """ShardedDataParallel's math for `world_size` virtual ranks in this process.

    Usage per step (ranks strictly in order 0..W-1; several backward passes inside one block
    accumulate, as under ShardedDataParallel.no_sync):
        for w in range(engine.world_size):
            with engine.virtual_rank(w):
                loss_fn(model(batch_of_rank(w))).backward()
        result = engine.step(lr)           # StepResult(skipped, grad_norm)
        engine.zero_grad()
    `engine.backward_rank(w, loss)` is the one-line form of the block.
    """

    def __init__(self, model: nn.Module, world_size: int, gpus_per_node: int | None = None, *,
                 optim: AdamWConfig = AdamWConfig(), comm: CommConfig = CommConfig.preset("sdp4bit"),
                 bucket_numel: int = 25_000_000, grad_clip: float | None = 1.0, seed: int = 0) -> None:
        L = world_size if gpus_per_node is None else gpus_per_node
        _check_layout(world_size, L)
        device = next(model.parameters()).device
        self.topo = VirtualTopology(nodes=world_size // L, gpus_per_node=L, device=device)
        validate_engine(model, self.topo, comm, grad_clip)
        self.module = model
        self.world_size = world_size
        self.optim = optim
        self.comm = comm
        self.bucket_numel = bucket_numel
        self.grad_clip = grad_clip
        self.seed = seed
        self.step_count = 0  # optimizer steps taken (skipped ones excluded)
        self.skipped_steps = 0

        self.buckets: list[Bucket] = build_buckets(model, bucket_numel, world_size, comm.alignment)
        self._slot = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        # Rank r's shard of bucket b lives at index r * B + b of the flat lists (the order in which
        # optim.adamw_ walks them does not matter: it is elementwise).
        self.master = [b.shard(b.replica, r).float().clone()
                       for r in range(world_size) for b in self.buckets]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]

        # Running sums, [W, chunk] per bucket in destination-rank order; two-level keeps them as
        # [L, M, chunk] (destinations of one local peer contiguous) plus a per-node [L, M * chunk].
        self._sums = [torch.empty(self._sum_shape(b), device=device) for b in self.buckets]
        self._node_sums = [torch.empty_like(s).view(L, -1) for s in self._sums] if self._two_hops else []
        self._active: int | None = None  # the virtual rank whose backward is running
        self._next_rank = 0  # ranks contribute in order: the sums add them like the collectives do
        self._hooks = register_grad_ready_hooks(list(self._slot), self._on_grad_ready)

    # ---- public API ---------------------------------------------------------------------------
    @property
    def stats(self) -> CommStats:
        """Bytes one real rank would send per link class (every rank sends the same amount)."""
        return self.topo.stats

    @contextlib.contextmanager
    def virtual_rank(self, rank: int) -> Iterator[None]:
        """Backward passes inside produce virtual rank `rank`'s gradient; leaving the block encodes
        it (this rank's first hop) and clears the gradient buffers for the next rank."""
        if self._active is not None:
            raise RuntimeError(f"virtual_rank({rank}) inside virtual_rank({self._active})")
        if rank != self._next_rank:
            raise ValueError(f"virtual ranks must contribute in order 0..{self.world_size - 1} once per "
                             f"step (the sums add them in the collectives' order): expected rank "
                             f"{self._next_rank}, got {rank}")
        self._active = rank
        try:
            yield
        except BaseException:
            self._clear_grads()
            raise
        finally:
            self._active = None
        for b in self.buckets:
            self._absorb(b, rank)
        self._clear_grads()
        self._next_rank += 1

    def backward_rank(self, rank: int, loss: torch.Tensor) -> None:
        """loss.backward() as virtual rank `rank` (one micro-batch, no accumulation)."""
        with self.virtual_rank(rank):
            loss.backward()

    def zero_grad(self) -> None:
        """Zero the gradient buffers and drop the contributions of ranks of a step that was never
        taken (a discarded batch), as ShardedDataParallel.zero_grad drops its reduce-scatters."""
        if self._active is not None:
            raise RuntimeError(f"zero_grad() inside virtual_rank({self._active})")
        self._next_rank = 0
        self._clear_grads()

    def step(self, lr: float | None = None) -> StepResult:
        """Finish the gradient reduction of all W ranks, update their master shards, apply the
        weight all-gathers to the replica. lr: this step's learning rate (None: AdamWConfig.lr)."""
        if self._active is not None or self._next_rank != self.world_size:
            raise RuntimeError(f"step() needs the gradients of all {self.world_size} virtual ranks, "
                               f"got {self._next_rank} (use virtual_rank(w) for w = 0..W-1)")
        self._next_rank = 0
        W, B = self.world_size, len(self.buckets)
        means = [self._mean_grad(b) for b in self.buckets]  # [bucket][rank]
        for b, rows in zip(self.buckets, means):
            for r, g in enumerate(rows):
                g[b.valid_in_shard(r):] = 0  # codec noise must not leak into the padding
        grads = [means[k][r] for r in range(W) for k in range(B)]

        # Each rank's partial sum as the real engine computes it, then the all-reduce in rank order.
        partial = [torch.stack([g.pow(2).sum() for g in grads[r * B:(r + 1) * B]]).sum() for r in range(W)]
        sumsq = partial[0]
        for p in partial[1:]:
            sumsq = sumsq + p
        norm = sumsq.sqrt()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            self.zero_grad()
            return StepResult(skipped=True, grad_norm=grad_norm)
        if self.grad_clip is not None:
            clip_(grads, norm, self.grad_clip)

        self.step_count += 1
        adamw_(self.master, self.exp_avg, self.exp_avg_sq, grads,
               lr=self.optim.lr if lr is None else lr, step=self.step_count, config=self.optim)
        for b in self.buckets:
            self._gather_weights(b)
        return StepResult(skipped=False, grad_norm=grad_norm)

    def memory_report(self) -> dict[str, int]:
        """Bytes this process holds; none of it grows with W beyond shard padding: replica, gradient
        buffer, fp32 running sums (grad_sums; two-level adds node_sums), fp32 master weights and
        AdamW state of all W shards (together one model's worth)."""
        def nbytes(ts: list[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        report = {
            "replica": nbytes([b.replica for b in self.buckets]),
            "grads": nbytes([b.grad for b in self.buckets]),
            "grad_sums": nbytes(self._sums),
            "node_sums": nbytes(self._node_sums),
            "master": nbytes(self.master),
            "optimizer": nbytes(self.exp_avg) + nbytes(self.exp_avg_sq),
        }
        report["total"] = sum(report.values())
        return report

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """Save replica, master shards, AdamW state, buffers, RNG and `extra` to the directory
        `path` (one torch.save file + meta.json), replacing an existing one only once complete."""
        if self._next_rank or self._active is not None:
            raise RuntimeError("save_checkpoint() in the middle of a step: call step() first")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {
            "replica": [b.replica for b in self.buckets],
            "master": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
            "buffers": dict(self.module.named_buffers()),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / "meta.json").write_text(json.dumps(self._meta(), indent=1))
        checkpoint.publish(tmp, path)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore what save_checkpoint wrote and return its `extra`. Raises ValueError, before
        reading any tensor, when the checkpoint is incomplete or belongs to another model, world
        size, node layout, comm config or bucket layout."""
        path = Path(path)
        if not (path / checkpoint.MARKER).exists() or not (path / STATE_FILE).exists():
            raise ValueError(f"checkpoint {path} is missing, incomplete (no {checkpoint.MARKER} "
                             f"marker) or not a virtual-rank checkpoint (no {STATE_FILE})")
        saved = json.loads((path / "meta.json").read_text())
        current = self._meta()
        checkpoint.check_compatible(saved, current, path)
        if saved["gpus_per_node"] != current["gpus_per_node"]:
            raise ValueError(f"checkpoint {path} was written with {saved['gpus_per_node']} virtual ranks "
                             f"per node, this run has {current['gpus_per_node']}")
        state = torch.load(path / STATE_FILE, map_location=self.topo.device, weights_only=False)
        with torch.no_grad():
            for b, replica in zip(self.buckets, state["replica"]):
                b.replica.copy_(replica)
            for name in ("master", "exp_avg", "exp_avg_sq"):
                for mine, saved_t in zip(getattr(self, name), state[name]):
                    mine.copy_(saved_t)
            buffers = dict(self.module.named_buffers())
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step_count = saved["step_count"]
        self.skipped_steps = saved["skipped_steps"]
        self.zero_grad()
        return state["extra"]

    # ---- gradients ----------------------------------------------------------------------------
    @property
    def _two_hops(self) -> bool:
        return self.comm.grads == "two-level" and self.topo.gpus_per_node > 1

    def _chunk(self, b: Bucket) -> int:
        """Values per destination rank in the running sums: the shard, padded to whole groups of
        the spec the receivers decode (as the collectives pad their chunks)."""
        spec = self.comm.grad_spec
        return b.shard_numel if spec is None else spec.padded_numel(b.shard_numel)

    def _sum_shape(self, b: Bucket) -> tuple[int, ...]:
        M, L = self.topo.nodes, self.topo.gpus_per_node
        return (L, M, self._chunk(b)) if self._two_hops else (self.world_size, self._chunk(b))

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if self._active is None:
            raise RuntimeError("backward() outside engine.virtual_rank(w): every gradient must "
                               "belong to a virtual rank")
        bucket, i = self._slot[p]
        view = bucket.param_view(bucket.grad, i)
        if p.grad.data_ptr() != view.data_ptr():  # .grad was reset to None: autograd made a new one
            view.copy_(p.grad)
            p.grad = view

    def _clear_grads(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            for i, p in enumerate(b.params):
                p.grad = b.param_view(b.grad, i)  # in case someone set .grad = None

    def _absorb(self, b: Bucket, rank: int) -> None:
        """Rank `rank`'s gradient of bucket b: the first hop of its reduce-scatter, decoded and
        added to the receivers' running sums (and, after a node's last rank, the inter hop)."""
        c, M, L = self.comm, self.topo.nodes, self.topo.gpus_per_node
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.GRADS)
        total = self._sums[b.index]
        if c.grads == "full":
            flat = total.view(-1)
            flat.add_(b.grad) if rank else flat.copy_(b.grad)
            if rank == self.world_size - 1:
                self._record_grads(b)
            return
        if not self._two_hops:  # one level; two-level with L == 1 is its inter hop alone
            hop = HOP_REDUCE_SCATTER if c.grads == "one-level" else HOP_INTER
            send = encode_chunks(b.grad, c.grad_spec, self.world_size, rank_seed(seed, rank, hop))
            quant.dequantize_messages(send, c.grad_spec, self._chunk(b), out=total, accumulate=rank > 0,
                                      rotate=False)
        else:
            node, local = divmod(rank, L)
            node_sum = self._node_sums[b.index]
            send = encode_two_level(b.grad, c.grad_intra_spec, c.grad_spec, M, L,
                                    rank_seed(seed, rank, HOP_INTRA))
            quant.dequantize_messages(send, c.grad_intra_spec, node_sum.shape[1], out=node_sum,
                                      accumulate=local > 0, rotate=False)
            if local == L - 1:  # the node is complete: middle hop of each local peer, then inter hop
                for peer in range(L):
                    packed = quant.quantize(node_sum[peer], c.grad_spec, rotate=False,
                                            seed=rank_seed(seed, node * L + peer, HOP_INTER))
                    quant.dequantize(packed, out=total[peer].view(-1), accumulate=node > 0, rotate=False)
        if rank == self.world_size - 1:
            self._record_grads(b)

    def _mean_grad(self, b: Bucket) -> list[torch.Tensor]:
        """The averaged fp32 gradient shard of every rank (what its reduce-scatter returns)."""
        W, s = self.world_size, b.shard_numel
        total = self._sums[b.index]
        if self.comm.grads == "full":  # the mean in the wire dtype, like out.div_(W) on gloo
            return list(total.view(-1).to(b.grad.dtype).div_(W).float().view(W, s))
        spec = self.comm.grad_spec
        if spec.hadamard:
            total = quant.fwht(total, spec.hadamard)
        if self._two_hops:  # [L, M, chunk] -> rank order r = node * L + local
            total = total.transpose(0, 1)
        return list(total.reshape(W, -1)[:, :s] * quant.fp32_reciprocal(W))  # as decode_sum averages

    def _record_grads(self, b: Bucket) -> None:
        c, M, L = self.comm, self.topo.nodes, self.topo.gpus_per_node
        n, elem = b.padded_numel, b.grad.element_size()
        baseline = reduce_scatter_bytes(n, elem, M, L)
        if c.grads == "two-level":
            sent = reduce_scatter_two_level_bytes(n, c.grad_intra_spec, c.grad_spec, M, L)
            self.stats.record("reduce_scatter_two_level", sent, baseline)
        else:
            self.stats.record("reduce_scatter", reduce_scatter_bytes(n, c.grad_spec or elem, M, L), baseline)

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def _gather_weights(self, b: Bucket) -> None:
        """Every rank's all-gather contribution applied to the one replica (shards are disjoint, so
        updating shard r first does not change what rank r + 1 sends)."""
        c, M, L, B = self.comm, self.topo.nodes, self.topo.gpus_per_node, len(self.buckets)
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.WEIGHTS)
        s = b.shard_numel
        for r in range(self.world_size):
            master, mine = self.master[r * B + b.index], b.shard(b.replica, r)
            if c.weights == "full":
                mine.copy_(master)
                continue
            # qWD: rank r sends master - replica shard; every rank adds the same decoded delta.
            qwd = c.weights == "qwd"
            send = encode_shard(master, c.weight_spec, rank_seed(seed, r, HOP_ALL_GATHER),
                                subtract=mine if qwd else None)
            decode_gathered(send.view(1, -1), c.weight_spec, s, mine, accumulate=qwd)
        baseline = all_gather_bytes(s, b.replica.element_size(), M, L)  # a gather in the replica dtype
        sent = baseline if c.weights == "full" else all_gather_bytes(s, c.weight_spec, M, L)
        self.stats.record("all_gather", sent, baseline)

    # ---- checkpoints --------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {**checkpoint.engine_meta(self), "gpus_per_node": self.topo.gpus_per_node}  # type: ignore[arg-type]


def _check_layout(world_size: int, gpus_per_node: int) -> None:
    for name, value in (("world_size", world_size), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"virtual {name} must be a positive integer, got {value!r}")
    if world_size % gpus_per_node:
        raise ValueError(f"virtual gpus_per_node ({gpus_per_node}) must divide world_size "
                         f"({world_size}): choose one of {divisors(world_size)}")
