"""ShardedDataParallel: a ZeRO-2 style distributed optimizer with quantized communication, written
once over a World (real ranks of a torch.distributed job, or virtual ranks in one process).

Every rank keeps a full replica of the model (its dtype) in flat buckets. Rank r owns shard r of
every bucket: the fp32 master weights and AdamW state for it, nothing else. One training step:

  backward   real ranks: a post-accumulate-grad hook marks params ready; a full bucket launches its
             (quantized) reduce-scatter asynchronously, in bucket order, overlapping the rest of
             backward. Virtual ranks: each rank's block (`as_rank(r)`) ends by sending its buckets.
  step()     the averaged fp32 grad shards -> global grad norm -> clip -> skip everywhere if
             non-finite -> per bucket, last first (the next forward's order): AdamW on its master
             shards, launch its weight all-gather (full / direct / qwd)
  forward    pre-hooks wait for the all-gathers of the buckets a module's params live in (prefetch)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from halfbyte.comm.accounting import CommStats
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology
from halfbyte.engine import checkpoint, seeds
from halfbyte.engine.buffers import Bucket, build_buckets, register_grad_ready_hooks
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.optim import adamw_, clip_
from halfbyte.engine.world import ProcessGroupWorld, World

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # True when the global grad norm was non-finite: no rank changed its weights
    grad_norm: float  # global L2 norm of the averaged gradient, before clipping


class ShardedDataParallel:
    """Wraps `model` (already on the world's device, in its compute dtype) for sharded data
    parallelism over `world` (a World, or a Topology for the real ranks of a torch.distributed job).

    Usage per step on real ranks:
        with engine.no_sync():             # optional gradient accumulation micro-batches
            loss_fn(model(x0)).backward()
        loss_fn(model(x1)).backward()      # the last micro-batch communicates
        result = engine.step(lr)           # StepResult(skipped, grad_norm)
        engine.zero_grad()
    On a VirtualWorld every rank's backward passes run inside `with engine.as_rank(r):`, for
    r = 0..W-1 in order (micro-batches inside one block accumulate), before step().

    Losses should be averaged over micro-batches by the caller, as with torch DDP; gradients are
    averaged over ranks here.
    """

    def __init__(self, model: nn.Module, world: World | Topology, optim: AdamWConfig = AdamWConfig(),
                 comm: CommConfig = CommConfig.preset("sdp4bit"), bucket_numel: int = 25_000_000,
                 grad_clip: float | None = 1.0, seed: int = 0) -> None:
        world = ProcessGroupWorld(world) if isinstance(world, Topology) else world
        validate_engine(model, world, comm, grad_clip)  # before anything touches the network
        self.module = model
        self.world = world
        self.optim = optim
        self.comm = comm
        self.bucket_numel = bucket_numel
        self.grad_clip = grad_clip
        self.seed = seed
        self.step_count = 0  # optimizer steps taken (skipped ones excluded)
        self.skipped_steps = 0

        self.buckets: list[Bucket] = build_buckets(model, bucket_numel, world.world_size, comm.alignment)
        self._slot: dict[nn.Parameter, tuple[Bucket, int]] = {
            p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        world.setup(self.buckets, comm)
        self._check_same_layout()
        # Start from the first rank's weights, frozen params and buffers everywhere, as torch DDP does.
        frozen = [p.data for p in model.parameters() if not p.requires_grad]
        world.broadcast_([b.replica for b in self.buckets] + frozen + [t.data for t in model.buffers()])

        # master[j][k]: bucket k's shard of the j-th owned rank (world.owned[j]); likewise the moments.
        self.master = [[b.shard(b.replica, r).float().clone() for b in self.buckets] for r in world.owned]
        self.exp_avg = [[torch.zeros_like(m) for m in row] for row in self.master]
        self.exp_avg_sq = [[torch.zeros_like(m) for m in row] for row in self.master]

        self._sync_grads = True
        self._next_launch = 0  # buckets launch strictly in index order, identically on every rank
        self._weight_work: list[Any] = [None] * len(self.buckets)
        self._hooks = register_grad_ready_hooks(list(self._slot), self._on_grad_ready)
        self._install_prefetch_hooks(model)

    # ---- public API ---------------------------------------------------------------------------
    @property
    def stats(self) -> CommStats:
        """Bytes sent by the ranks this process plays, per link class."""
        return self.world.stats

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients; the next one outside communicates."""
        previous, self._sync_grads = self._sync_grads, False
        try:
            yield
        finally:
            self._sync_grads = previous

    @contextlib.contextmanager
    def as_rank(self, rank: int) -> Iterator[None]:
        """Backward passes inside are global rank `rank`'s. On a VirtualWorld every rank contributes
        once per step, in order 0..W-1: backward passes inside accumulate, and leaving the block
        sends the rank's gradients. On real ranks `rank` must be this process's rank and the block
        changes nothing (use no_sync() for accumulation): one training loop serves both."""
        world = self.world
        world.begin_rank(rank)
        previous = self._sync_grads
        if world.defers_gradients:
            self._sync_grads = False
        try:
            yield
        except BaseException:
            self._sync_grads = previous
            self._clear_grad_buffers()
            world.end_rank(rank, completed=False)
            raise
        self._sync_grads = previous
        if world.defers_gradients:
            self._launch_ready(force=True)
            self._next_launch = 0
        world.end_rank(rank, completed=True)

    def zero_grad(self) -> None:
        """Zero the gradient buffers. Reductions started without a step() (a discarded batch) are
        completed and dropped, identically on every rank. Weight all-gathers stay in flight: the
        gradient buffers are separate, and forward waits for them per bucket."""
        self.world.discard_gradients()
        self._clear_grad_buffers()
        self._next_launch = 0

    def step(self, lr: float | None = None) -> StepResult:
        """Finish the gradient reduction, update the owned master shards, start the weight
        all-gathers. lr: this step's learning rate (None: AdamWConfig.lr)."""
        world = self.world
        world.check_step()
        self.wait_weights()
        if not world.defers_gradients:
            self._launch_ready(force=True)  # buckets holding params that backward never reached
            self._next_launch = 0
        per_bucket = [world.gradient_shards(b) for b in self.buckets]  # [bucket][owned rank]
        for b, shards in zip(self.buckets, per_bucket):
            for r, g in zip(world.owned, shards):
                g[b.valid_in_shard(r):] = 0  # codec noise must not leak into the padding
        grads = [list(row) for row in zip(*per_bucket)]  # [owned rank][bucket], as self.master

        # Each rank's partial sum as one real rank computes it, then the sum over all ranks.
        partials = [torch.stack([g.pow(2).sum() for g in row]).sum() for row in grads]
        norm = world.sum_over_ranks(partials).sqrt()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            if world.leader:
                logger.warning("step %d skipped: gradient norm is %s (%d skipped so far)",
                               self.step_count + 1, grad_norm, self.skipped_steps)
            self.zero_grad()
            return StepResult(skipped=True, grad_norm=grad_norm)
        if self.grad_clip is not None:
            clip_([g for row in grads for g in row], norm, self.grad_clip)

        self.step_count += 1
        lr = self.optim.lr if lr is None else lr
        # Buckets are in backward order, so the next forward needs the last one first: update and
        # send in reverse, each all-gather starting while earlier buckets are still being updated.
        for k in reversed(range(len(self.buckets))):
            column = range(len(world.owned))
            adamw_([self.master[j][k] for j in column], [self.exp_avg[j][k] for j in column],
                   [self.exp_avg_sq[j][k] for j in column], [grads[j][k] for j in column],
                   lr=lr, step=self.step_count, config=self.optim)
            self._launch_weight_gather(k)
        return StepResult(skipped=False, grad_norm=grad_norm)

    def check_replicas(self) -> None:
        """Raise RuntimeError naming the first bucket whose replica differs between ranks (bit-exact
        checksum, one all-reduce; virtual ranks share one replica)."""
        self.wait_weights()
        sums = []
        for b in self.buckets:
            bits = _as_int(b.replica).to(torch.int64)
            pos = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521
            sums += [bits.sum(), (bits * pos).sum()]
        same = self.world.agree(torch.stack(sums).cpu())
        for b in self.buckets:
            if not bool(same[2 * b.index : 2 * b.index + 2].all()):
                raise RuntimeError(f"replica bucket {b.index} ({b.names[0]} ... {b.names[-1]}) "
                                   "differs between ranks")

    def refresh_replica(self) -> None:
        """All-gather the master shards uncompressed into every replica and wait (after the masters
        were replaced from outside, e.g. by an outer step across islands or a checkpoint)."""
        self.wait_weights()
        for k, b in enumerate(self.buckets):
            work = self.world.gather_weights(b, [row[k] for row in self.master], "full", None, None)
            if work is not None:
                work.wait()

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Zero the master and moment values past the real parameters. The engine keeps them zero
        (gradients are zeroed there); whoever writes masters from outside (an outer step, a
        checkpoint load) calls this, since the padding shares quantization groups with real values."""
        for j, rank in enumerate(self.world.owned):
            for k, b in enumerate(self.buckets):
                valid = b.valid_in_shard(rank)
                for rows in (self.master, self.exp_avg, self.exp_avg_sq):
                    rows[j][k][valid:] = 0

    def memory_report(self) -> dict[str, int]:
        """Bytes this process holds: replica, gradient buffer, the world's reduction buffers (fp32
        grad shards for real ranks; running sums for virtual ones), fp32 master shards, AdamW state."""
        def nbytes(rows: list[list[torch.Tensor]]) -> int:
            return sum(t.numel() * t.element_size() for row in rows for t in row)

        report = {
            "replica": sum(b.replica.numel() * b.replica.element_size() for b in self.buckets),
            "grads": sum(b.grad.numel() * b.grad.element_size() for b in self.buckets),
            **self.world.memory_report(),
            "master": nbytes(self.master),
            "optimizer": nbytes(self.exp_avg) + nbytes(self.exp_avg_sq),
        }
        report["total"] = sum(report.values())
        return report

    def wait_weights(self, indices: Iterable[int] | None = None) -> None:
        """Finish the weight all-gathers started by step() (of the given bucket indices, default
        all). Forward does this by itself, bucket by bucket; call it before reading the parameters
        any other way (e.g. comparing or exporting them right after step())."""
        for k in range(len(self.buckets)) if indices is None else indices:
            work = self._weight_work[k]
            if work is not None:
                work.wait()
                self._weight_work[k] = None

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights of every trainable parameter, whole, by name, on the CPU (collective:
        every rank calls it and gets all of it). What a checkpoint of this run exports."""
        out: dict[str, torch.Tensor] = {}
        for k, b in enumerate(self.buckets):
            flat = self.world.all_gather([row[k] for row in self.master]).cpu()
            for name, p, offset in zip(b.names, b.params, b.offsets):
                out[name] = flat[offset: offset + p.numel()].view(p.shape).clone()
        return out

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Save the whole training state plus the caller's `extra` (data position, ...) to the
        directory `path` (halfbyte.engine.checkpoint). Collective: every rank calls it."""
        checkpoint.save(path, {"": self}, extra or {}, self.world)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore a checkpoint written by save_checkpoint (by any number of ranks, real or
        virtual) and return its `extra`; CheckpointError (a ValueError) when it cannot be loaded."""
        return checkpoint.load(path, {"": self}, self.world)

    @property
    def in_flight(self) -> bool:
        """True while a gradient reduction of this step has started (no checkpoint now)."""
        return any(self.world.pending(b) for b in self.buckets)

    # ---- gradients ----------------------------------------------------------------------------
    def _clear_grad_buffers(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            b.ready.clear()
            for i, p in enumerate(b.params):
                p.grad = b.param_view(b.grad, i)  # in case someone set .grad = None

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        error = self.world.gradient_error()
        if error is not None:
            raise RuntimeError(error)
        bucket, i = self._slot[p]
        view = bucket.param_view(bucket.grad, i)
        if p.grad.data_ptr() != view.data_ptr():  # .grad was reset to None: autograd made a new one
            view.copy_(p.grad)
            p.grad = view
        if self.world.pending(bucket):
            # Checked in no_sync too: a gradient added after the reduce-scatter would be dropped.
            raise RuntimeError(
                f"gradient of {bucket.names[i]} arrived after its bucket was reduce-scattered: a second "
                "backward before step()? Run the accumulation micro-batches inside engine.no_sync() "
                "and the communicating one last")
        if not self._sync_grads:
            return
        bucket.ready.add(i)
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        """Launch reductions in bucket order: the same collective sequence on every rank even when
        buckets complete in a different order. force: launch all the rest."""
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if not force and len(b.ready) < len(b.params):
                return
            self.world.reduce_scatter(b, seeds.collective_seed(self.seed, self.step_count, b.index, seeds.GRADS))
            b.ready.clear()
            self._next_launch += 1

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def _launch_weight_gather(self, k: int) -> None:
        c, b = self.comm, self.buckets[k]
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.WEIGHTS)
        self._weight_work[k] = self.world.gather_weights(b, [row[k] for row in self.master], c.weights,
                                                         c.weight_spec, seed)

    def _install_prefetch_hooks(self, model: nn.Module) -> None:
        """Each module owning params waits for their buckets right before its forward; whatever is
        still in flight is waited when the whole forward ends (before backward can read weights)."""
        for module in model.modules():
            owned = sorted({self._slot[p][0].index for p in module.parameters(recurse=False)
                            if p in self._slot})
            if owned:
                module.register_forward_pre_hook(lambda _m, _args, ks=tuple(owned): self.wait_weights(ks))
        model.register_forward_hook(lambda *_: self.wait_weights())

    def _check_same_layout(self) -> None:
        """Raise ValueError unless every rank has the same params, buckets and comm config: ranks
        that disagree would otherwise hang or exchange garbage in the first size-dependent
        collective."""
        layout = [[[n, list(p.shape)] for b in self.buckets for n, p in zip(b.names, b.params)],
                  [[len(b.params), b.shard_numel] for b in self.buckets],
                  json.loads(json.dumps(self.comm.to_dict())), str(self.buckets[0].replica.dtype)]
        digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).digest()
        h = int.from_bytes(digest[:7], "little")  # 56 bits: fits int64 with room for the negation
        if not bool(self.world.agree(torch.tensor([h], dtype=torch.int64)).all()):
            raise ValueError("ranks disagree on the model's parameters (names, shapes, dtype), the bucket "
                             "layout or the CommConfig: build the same model with the same settings on "
                             "every rank")


def validate_engine(model: nn.Module, world: World, config: CommConfig, grad_clip: float | None) -> None:
    """Every check that needs no communication: raise ValueError before the first collective."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None (off), got {grad_clip!r}")
    devices = {p.device for p in model.parameters()}
    if devices != {torch.device(world.device)}:
        raise ValueError(f"the model's parameters are on {sorted(map(str, devices))} but the world's "
                         f"collectives use {world.device}: move the model there first")
    if config.grads == "two-level" and world.nodes < 2:
        raise ValueError(
            f"CommConfig.grads='two-level' needs at least 2 nodes, but the world is "
            f"{world.nodes} node x {world.gpus_per_node} ranks: the inter-node hop would be empty. "
            "Use CommConfig.for_nodes(1) (one level with the inter-node codec), or emulate nodes "
            "with build_topology(gpus_per_node=...)")


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as a same-width signed integer tensor."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
