"""ShardedDataParallel: a ZeRO-2 style distributed optimizer with quantized communication.

Every rank keeps a full replica of the model (its dtype) in flat buckets. Rank r owns shard r of
every bucket: the fp32 master weights and AdamW state for it, nothing else. One training step:

  backward   a post-accumulate-grad hook marks params ready; a full bucket launches its (quantized)
             reduce-scatter asynchronously, in bucket order, overlapping the rest of backward
  step()     wait the reduce-scatters -> averaged fp32 grad shard -> global grad norm (one scalar
             all-reduce) -> clip -> skip everywhere if non-finite -> per bucket, last first (the
             next forward's order): AdamW on its master shard, launch its weight all-gather
             (full / direct / qwd)
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
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

import halfbyte.comm as hcomm
from halfbyte.comm.accounting import CommStats
from halfbyte.comm.topology import Topology
from halfbyte.engine import seeds
from halfbyte.engine.buffers import Bucket, build_buckets, register_grad_ready_hooks
from halfbyte.engine.checkpoint import engine_meta, load_checkpoint, save_checkpoint
from halfbyte.comm.config import CommConfig
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.optim import adamw_, clip_

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # True when the global grad norm was non-finite: no rank changed its weights
    grad_norm: float  # global L2 norm of the averaged gradient, before clipping


class ShardedDataParallel:
    """Wraps `model` (already on topo.device, in its compute dtype) for sharded data parallelism.

    Usage per step:
        with engine.no_sync():             # optional gradient accumulation micro-batches
            loss_fn(model(x0)).backward()
        loss_fn(model(x1)).backward()      # the last micro-batch communicates
        result = engine.step(lr)           # StepResult(skipped, grad_norm)
        engine.zero_grad()

    Losses should be averaged over micro-batches by the caller, as with torch DDP; gradients are
    averaged over ranks here.
    """

    def __init__(self, model: nn.Module, topo: Topology, optim: AdamWConfig = AdamWConfig(),
                 comm: CommConfig = CommConfig.preset("sdp4bit"), bucket_numel: int = 25_000_000,
                 grad_clip: float | None = 1.0, seed: int = 0) -> None:
        validate_engine(model, topo, comm, grad_clip)  # before anything touches the network
        self.module = model
        self.topo = topo
        self.optim = optim
        self.comm = comm
        self.bucket_numel = bucket_numel
        self.grad_clip = grad_clip
        self.seed = seed
        self.step_count = 0  # optimizer steps taken (skipped ones excluded)
        self.skipped_steps = 0

        self.buckets: list[Bucket] = build_buckets(model, bucket_numel, topo.world_size, comm.alignment)
        self._slot: dict[nn.Parameter, tuple[Bucket, int]] = {
            p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}

        _check_same_layout(self)
        # Start from the group's first rank's weights, frozen params and buffers everywhere, as
        # torch DDP does (group_src: the topology may be a sub-group, e.g. one island).
        for b in self.buckets:
            dist.broadcast(b.replica, group_src=0, group=topo.world_group)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for t in [*frozen, *model.buffers()]:
            dist.broadcast(t.data, group_src=0, group=topo.world_group)

        r = topo.rank
        self.master = [b.shard(b.replica, r).float().clone() for b in self.buckets]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]

        self._sync_grads = True
        self._next_launch = 0  # buckets launch strictly in index order, identically on every rank
        self._grad_work: list[Any] = [None] * len(self.buckets)
        self._weight_work: list[Any] = [None] * len(self.buckets)
        self._hooks = register_grad_ready_hooks(list(self._slot), self._on_grad_ready)
        self._install_prefetch_hooks(model)

    # ---- public API ---------------------------------------------------------------------------
    @property
    def stats(self) -> CommStats:
        """Bytes this rank sent per link class, from the topology."""
        return self.topo.stats

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients; the next one outside communicates."""
        previous, self._sync_grads = self._sync_grads, False
        try:
            yield
        finally:
            self._sync_grads = previous

    def zero_grad(self) -> None:
        """Zero the gradient buffers. Reduce-scatters a backward started without a step() (a
        discarded batch) are completed and dropped, identically on every rank. Weight all-gathers
        stay in flight: the gradient buffers are separate, and forward waits for them per bucket."""
        for work in self._grad_work:
            if work is not None:
                work.wait()
        self._grad_work = [None] * len(self.buckets)
        for b in self.buckets:
            b.grad.zero_()
            b.ready.clear()
            for i, p in enumerate(b.params):
                p.grad = b.param_view(b.grad, i)  # in case someone set .grad = None
        self._next_launch = 0

    def step(self, lr: float | None = None) -> StepResult:
        """Finish the gradient reduction, update the owned master shards, start the weight
        all-gathers. lr: this step's learning rate (None: AdamWConfig.lr)."""
        self.wait_weights()
        self._launch_ready(force=True)  # buckets holding params that backward never reached
        grads = []
        for b, work in zip(self.buckets, self._grad_work):
            g = work.wait()
            g[b.valid_in_shard(self.topo.rank):] = 0  # codec noise must not leak into the padding
            grads.append(g)
        self._grad_work = [None] * len(self.buckets)
        self._next_launch = 0

        sumsq = torch.stack([g.pow(2).sum() for g in grads]).sum()
        dist.all_reduce(sumsq, group=self.topo.world_group)
        norm = sumsq.sqrt()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            if self.topo.rank == 0:
                logger.warning("step %d skipped: gradient norm is %s (%d skipped so far)",
                               self.step_count + 1, grad_norm, self.skipped_steps)
            self.zero_grad()
            return StepResult(skipped=True, grad_norm=grad_norm)
        if self.grad_clip is not None:
            clip_(grads, norm, self.grad_clip)

        self.step_count += 1
        lr = self.optim.lr if lr is None else lr
        # Buckets are in backward order, so the next forward needs the last one first: update and
        # send in reverse, each all-gather starting while later buckets are still being updated.
        for k in reversed(range(len(self.buckets))):
            adamw_([self.master[k]], [self.exp_avg[k]], [self.exp_avg_sq[k]], [grads[k]],
                   lr=lr, step=self.step_count, config=self.optim)
            self._launch_weight_gather(k)
        return StepResult(skipped=False, grad_norm=grad_norm)

    def check_replicas(self) -> None:
        """Raise RuntimeError naming the first bucket whose replica differs between ranks (bit-exact
        checksum, one all-reduce)."""
        self.wait_weights()
        sums = []
        for b in self.buckets:
            bits = _as_int(b.replica).to(torch.int64)
            pos = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521
            sums += [bits.sum(), (bits * pos).sum()]
        local = torch.stack(sums)
        both = torch.cat([local, -local])  # max of (x, -x) gives max and -min in one all-reduce
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.topo.world_group)
        hi, lo = both[: local.numel()], -both[local.numel():]
        for b in self.buckets:
            k = 2 * b.index
            if not torch.equal(hi[k : k + 2], lo[k : k + 2]):
                raise RuntimeError(f"replica bucket {b.index} ({b.names[0]} ... {b.names[-1]}) "
                                   "differs between ranks")

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: replica, gradient buffer, fp32 grad shards after the reduce-scatter,
        fp32 master shards, AdamW state (exp_avg + exp_avg_sq)."""
        def nbytes(ts: list[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        report = {
            "replica": nbytes([b.replica for b in self.buckets]),
            "grads": nbytes([b.grad for b in self.buckets]),
            "grad_shards": nbytes(self.master),  # fp32, same size as the master shards
            "master": nbytes(self.master),
            "optimizer": nbytes(self.exp_avg) + nbytes(self.exp_avg_sq),
        }
        report["total"] = sum(report.values())
        return report

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        save_checkpoint(self, path, extra or {})

    def load_checkpoint(self, path: str | Path) -> dict:
        return load_checkpoint(self, path)

    # ---- gradients ----------------------------------------------------------------------------
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bucket, i = self._slot[p]
        view = bucket.param_view(bucket.grad, i)
        if p.grad.data_ptr() != view.data_ptr():  # .grad was reset to None: autograd made a new one
            view.copy_(p.grad)
            p.grad = view
        if self._grad_work[bucket.index] is not None:
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
        """Launch reduce-scatters in bucket order: the same collective sequence on every rank even
        when buckets complete in a different order. force: launch all the rest (from step())."""
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if not force and len(b.ready) < len(b.params):
                return
            self._grad_work[b.index] = self._reduce_scatter(b)
            b.ready.clear()
            self._next_launch += 1

    def _reduce_scatter(self, b: Bucket) -> Any:
        c, topo = self.comm, self.topo
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.GRADS)
        kw = dict(op="avg", out_dtype=torch.float32, async_op=True)
        if c.grads == "two-level":
            return hcomm.reduce_scatter_two_level(b.grad, c.grad_intra_spec, c.grad_spec, topo,
                                                 seed=seed, **kw)
        spec = c.grad_spec if c.grads == "one-level" else None
        return hcomm.reduce_scatter_q(b.grad, spec, topo, seed=seed if spec is not None else None, **kw)

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def _launch_weight_gather(self, k: int) -> None:
        c, topo, b, master = self.comm, self.topo, self.buckets[k], self.master[k]
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.WEIGHTS)
        if c.weights == "full":
            work = hcomm.all_gather_q(master.to(b.replica.dtype), None, topo, out=b.replica, async_op=True)
        elif c.weights == "direct":
            work = hcomm.all_gather_q(master, c.weight_spec, topo, out=b.replica, seed=seed, async_op=True)
        else:  # qwd: every rank, owner included, adds the same decoded delta
            work = hcomm.all_gather_q(master, c.weight_spec, topo, out=b.replica, accumulate=True,
                                     subtract=b.shard(b.replica, topo.rank), seed=seed, async_op=True)
        self._weight_work[k] = work

    def wait_weights(self, indices: Any = None) -> None:
        """Finish the weight all-gathers started by step() (of the given bucket indices, default
        all). Forward does this by itself, bucket by bucket; call it before reading the parameters
        any other way (e.g. comparing or exporting them right after step())."""
        for k in range(len(self.buckets)) if indices is None else indices:
            work = self._weight_work[k]
            if work is not None:
                work.wait()
                self._weight_work[k] = None

    def _install_prefetch_hooks(self, model: nn.Module) -> None:
        """Each module owning params waits for their buckets right before its forward; whatever is
        still in flight is waited when the whole forward ends (before backward can read weights)."""
        for module in model.modules():
            owned = sorted({self._slot[p][0].index for p in module.parameters(recurse=False)
                            if p in self._slot})
            if owned:
                module.register_forward_pre_hook(lambda _m, _args, ks=tuple(owned): self.wait_weights(ks))
        model.register_forward_hook(lambda *_: self.wait_weights())


def validate_engine(model: nn.Module, topo: Topology, config: CommConfig, grad_clip: float | None) -> None:
    """Every check that needs no communication: raise ValueError before the first collective."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None (off), got {grad_clip!r}")
    devices = {p.device for p in model.parameters()}
    if devices != {torch.device(topo.device)}:
        raise ValueError(f"the model's parameters are on {sorted(map(str, devices))} but the topology's "
                         f"collectives use {topo.device}: move the model there first")
    if config.grads == "two-level" and topo.nodes < 2:
        raise ValueError(
            f"CommConfig.grads='two-level' needs at least 2 nodes, but the topology is "
            f"{topo.nodes} node x {topo.gpus_per_node} ranks: the inter-node hop would be empty. "
            "Use grads='one-level' with the inter-node spec, or emulate nodes with "
            "build_topology(gpus_per_node=...)")


def _check_same_layout(engine: ShardedDataParallel) -> None:
    """Raise ValueError unless every rank has the same params, buckets and comm config: ranks that
    disagree would otherwise hang or exchange garbage in the first size-dependent collective."""
    meta = engine_meta(engine)
    digest = hashlib.sha256(json.dumps([meta["params"], meta["buckets"], meta["comm"], meta["dtype"]],
                                       sort_keys=True).encode()).digest()
    h = int.from_bytes(digest[:7], "little")  # 56 bits: fits int64 with room for the negation
    both = torch.tensor([h, -h], dtype=torch.int64, device=engine.topo.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=engine.topo.world_group)
    if int(both[0]) != -int(both[1]):
        raise ValueError("ranks disagree on the model's parameters (names, shapes, dtype), the bucket "
                         "layout or the CommConfig: build the same model with the same settings on "
                         "every rank")


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as a same-width signed integer tensor."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
