"""ShardedDataParallel: a ZeRO-2 style distributed optimizer with quantized communication, written
once over a World (real ranks of a torch.distributed job, or virtual ranks in one process).

Every rank keeps a full replica of the model (each parameter in its own dtype) in flat buckets, one
parameter group and one dtype per bucket. Rank r owns shard r of every bucket: the fp32 master
weights and AdamW state for it, nothing else. One training step:

  backward   real ranks: a post-accumulate-grad hook marks params ready; a full bucket launches its
             (quantized) reduce-scatter asynchronously, in bucket order, overlapping the rest of
             backward. Virtual ranks: each rank's block (`as_rank(r)`) ends by sending its buckets.
  step()     the averaged fp32 grad shards -> global grad norm -> clip -> skip everywhere if
             non-finite -> per bucket, last first (the next forward's order): AdamW with its group's
             hyper-parameters on its master shards, launch its weight all-gather (full / direct /
             qwd) -> persistent buffers from the first rank
  forward    pre-hooks wait for the all-gathers of the buckets a module's params live in (prefetch)

The engine is a torch.optim.Optimizer: `param_groups` (torch's list of dicts, settable between
steps), `state_dict()` / `load_state_dict()` in torch.optim.AdamW's format, so that torch's LR
schedulers attach to it. What torch code does behind its back is refused instead of lost: a change
of requires_grad or of a parameter's storage raises at the next step, and so does a gradient changed
in place after backward (torch.nn.utils.clip_grad_norm_ on the model: p.grad holds this rank's
unreduced gradient, already sent); model.load_state_dict writes the fp32 masters too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import torch
from torch import nn

from halfbyte.comm.accounting import CommStats
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology
from halfbyte.engine import checkpoint, seeds
from halfbyte.engine.buffers import Bucket, build_buckets, register_grad_ready_hooks
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.groups import (
    IMPLEMENTATION_KEYS,
    TORCH_ADAMW_FLAGS,
    assign_groups,
    check_torch_flags,
    group_config,
    torch_flags,
)
from halfbyte.engine.optim import adamw_, clip_
from halfbyte.engine.world import ProcessGroupWorld, World

logger = logging.getLogger(__name__)

PARAM_DTYPES = (torch.float32, torch.bfloat16)  # what the codecs and the fp32 masters serve


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # True when the global grad norm was non-finite: no rank changed its weights
    grad_norm: float  # global L2 norm of the averaged gradient, before clipping


class ShardedDataParallel(torch.optim.Optimizer):
    """Wraps `model` (already on the world's device, in its compute dtype; parameters may mix
    dtypes, e.g. fp32 norms in a bf16 model) for sharded data parallelism over `world` (a World, or
    a Topology for the real ranks of a torch.distributed job), and is its optimizer.

    param_groups: torch.optim's list of dicts (`[{"params": [...], "weight_decay": 0.0}, ...]`,
    keys lr, betas, eps, weight_decay; missing ones from `optim`), or None: one group of every
    trainable parameter. Every trainable parameter must be in a group.
    broadcast_buffers: at every step, every persistent buffer (BatchNorm statistics, ...) takes the
    first rank's values, as torch DDP's broadcast_buffers does at every forward (the same values
    with one micro-batch per step, one broadcast per step with accumulation); check_replicas then
    covers all buffers. False: each rank keeps its own.

    Usage per step on real ranks:
        with engine.no_sync():             # optional gradient accumulation micro-batches
            loss_fn(model(x0)).backward()
        loss_fn(model(x1)).backward()      # the last micro-batch communicates
        engine.clip_grad_norm_(1.0)        # optional (else grad_clip applies in step)
        result = engine.step()             # StepResult(skipped, grad_norm)
        engine.zero_grad()
        scheduler.step()                   # any torch.optim.lr_scheduler on the engine
    On a VirtualWorld every rank's backward passes run inside `with engine.as_rank(r):`, for
    r = 0..W-1 in order (micro-batches inside one block accumulate), before step().

    Losses should be averaged over micro-batches by the caller, as with torch DDP; gradients are
    averaged over ranks here.
    """

    def __init__(self, model: nn.Module, world: World | Topology, optim: AdamWConfig = AdamWConfig(),
                 comm: CommConfig = CommConfig.preset("sdp4bit"), bucket_numel: int = 25_000_000,
                 grad_clip: float | None = 1.0, seed: int = 0, *,
                 param_groups: Iterable[dict[str, Any]] | None = None, broadcast_buffers: bool = True) -> None:
        world = ProcessGroupWorld(world) if isinstance(world, Topology) else world
        validate_engine(model, world, comm, grad_clip)  # before anything touches the network
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        defaults = {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay}
        super().__init__(trainable if param_groups is None else param_groups, defaults)
        group_of = assign_groups(model, self.param_groups)
        for g in range(len(self.param_groups)):
            group_config(self.param_groups, g, optim)  # every group's values valid before anything moves
        self.module = model
        self.world = world
        self.optim = optim
        self.comm = comm
        self.bucket_numel = bucket_numel
        self.grad_clip = grad_clip
        self.seed = seed
        self.broadcast_buffers = broadcast_buffers
        self.step_count = 0  # optimizer steps taken (skipped ones excluded)
        self.skipped_steps = 0

        self.buckets: list[Bucket] = build_buckets(model, bucket_numel, world.world_size, comm.alignment, group_of)
        self._slot: dict[nn.Parameter, tuple[Bucket, int]] = {
            p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        # Where each laid-out parameter's values and gradient live; anything else later is refused.
        self._storage = {p: (p.data_ptr(), p.grad.data_ptr()) for p in self._slot}
        self._group_params = [[id(p) for p in g["params"]] for g in self.param_groups]
        world.setup(self.buckets, comm)
        self._check_same_layout()
        # Start from the first rank's weights, frozen params and buffers everywhere, as torch DDP does.
        frozen = [p.data for p in model.parameters() if not p.requires_grad]
        world.broadcast_([b.replica for b in self.buckets] + frozen + [t.data for t in model.buffers()])
        self._persistent = _persistent_buffers(model) if broadcast_buffers else []
        self._rank_buffers: dict[str, list[torch.Tensor]] = {}  # virtual ranks: see _buffers_enter

        # master[j][k]: bucket k's shard of the j-th owned rank (world.owned[j]); likewise the moments.
        self.master = [[b.shard(b.replica, r).float().clone() for b in self.buckets] for r in world.owned]
        self.exp_avg = [[torch.zeros_like(m) for m in row] for row in self.master]
        self.exp_avg_sq = [[torch.zeros_like(m) for m in row] for row in self.master]

        self._sync_grads = True
        self._next_launch = 0  # buckets launch strictly in index order, identically on every rank
        # This step's reduced gradient shards and their global norm, once clip_grad_norm_ or step()
        # reduced them; whether clip_grad_norm_ clipped them (then step() does not clip again).
        self._reduced: tuple[list[list[torch.Tensor]], torch.Tensor] | None = None
        self._clipped = False
        self._weight_work: list[Any] = [None] * len(self.buckets)
        self._hooks = register_grad_ready_hooks(list(self._slot), self._on_grad_ready)
        self._install_prefetch_hooks(model)
        self._install_load_hooks(model)

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
        self._buffers_enter(rank)
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
        self._buffers_leave(rank)
        world.end_rank(rank, completed=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers. Reductions started without a step() (a discarded batch) are
        completed and dropped, identically on every rank. Weight all-gathers stay in flight: the
        gradient buffers are separate, and forward waits for them per bucket. set_to_none is
        accepted for torch.optim's signature only: each p.grad stays a view into its bucket."""
        self.world.discard_gradients()
        self._clear_grad_buffers()
        self._next_launch = 0
        self._reduced, self._clipped = None, False

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip this step's averaged gradient to a global L2 norm of at most max_norm, the
        arithmetic of torch.nn.utils.clip_grad_norm_, and return its norm before clipping (a 0-dim
        fp32 tensor, the same on every rank; non-finite: step() will skip). Call it after the last
        backward (on virtual ranks, after every rank's block) and before step(); it finishes the
        gradient reduction (collective), and step() then does not apply grad_clip. Calling
        torch.nn.utils.clip_grad_norm_ on the model instead raises at step(): p.grad holds this
        rank's local gradient, already sent."""
        if not 0 < max_norm < float("inf"):
            raise ValueError(f"clip_grad_norm_: max_norm must be a finite number > 0, got {max_norm!r}")
        if self._clipped:
            raise RuntimeError("clip_grad_norm_ was already called for this step: call it once, before step()")
        self.world.check_step()
        grads, norm = self._reduce()
        if math.isfinite(float(norm)):
            clip_([g for row in grads for g in row], norm, max_norm)
        self._clipped = True
        return norm.detach().clone()

    def step(self, lr: float | None = None) -> StepResult:
        """Finish the gradient reduction, update the owned master shards, start the weight
        all-gathers. lr: this step's learning rate for every group, overriding their param_groups
        "lr" for this step only (None: each group's own, e.g. set by an LR scheduler)."""
        if callable(lr):
            raise TypeError("step(closure) is not supported: compute the loss and call backward() before step()")
        configs = [group_config(self.param_groups, g, self.optim, lr) for g in range(len(self.param_groups))]
        world = self.world
        world.check_step()
        self.wait_weights()
        grads, norm = self._reduce()
        clipped, self._reduced, self._clipped = self._clipped, None, False
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            if world.leader:
                logger.warning("step %d skipped: gradient norm is %s (%d skipped so far)",
                               self.step_count + 1, grad_norm, self.skipped_steps)
            self.zero_grad()
            self._sync_buffers()
            return StepResult(skipped=True, grad_norm=grad_norm)
        if self.grad_clip is not None and not clipped:
            clip_([g for row in grads for g in row], norm, self.grad_clip)

        self.step_count += 1
        # Buckets are in backward order, so the next forward needs the last one first: update and
        # send in reverse, each all-gather starting while earlier buckets are still being updated.
        for k in reversed(range(len(self.buckets))):
            config, column = configs[self.buckets[k].group], range(len(world.owned))
            adamw_([self.master[j][k] for j in column], [self.exp_avg[j][k] for j in column],
                   [self.exp_avg_sq[j][k] for j in column], [grads[j][k] for j in column],
                   lr=config.lr, step=self.step_count, config=config)
            self._launch_weight_gather(k)
        for b in self.buckets:
            b.grad_version = None  # the next backward starts a new step
        self._sync_buffers()
        return StepResult(skipped=False, grad_norm=grad_norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, while the engine is being built only: the buckets are laid out once."""
        if hasattr(self, "buckets"):
            raise RuntimeError("add_param_group after the engine was built: its buckets are laid out at "
                               "construction; pass every group as ShardedDataParallel(..., param_groups=[...])")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch.optim.AdamW's format, whole, on the CPU (collective): state
        by parameter index (in param_groups order) with step, exp_avg and exp_avg_sq for every
        trained parameter (none before the first step), and param_groups with their hyper-parameters
        and AdamW's flags. torch.optim.AdamW(same groups).load_state_dict takes it, and
        load_state_dict takes one of torch's. Not in it, as with torch: the weights
        (full_state_dict(), model.load_state_dict) and the engine's own counters."""
        moments = {name: self._gather(getattr(self, name)) for name in ("exp_avg", "exp_avg_sq")}
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups, index = [], 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                if p in self._slot and self.step_count > 0:
                    state[index] = {"step": torch.tensor(float(self.step_count)),
                                    "exp_avg": moments["exp_avg"][p], "exp_avg_sq": moments["exp_avg_sq"][p]}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, **torch_flags(self.optim),
                           "params": ids})
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() (or torch.optim.AdamW's with the same groups) returned: the
        moments of the owned shards, the step count and every group's hyper-parameters (and other
        keys, as torch does). ValueError, before anything changes, when the groups do not match
        or the state is not one AdamW step count for all parameters."""
        saved_groups, saved = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError("the state dict's parameter groups (sizes "
                             f"{[len(g['params']) for g in saved_groups]}) differ from the engine's "
                             f"({[len(g['params']) for g in self.param_groups]}): build the engine with the same groups")
        for g, group in enumerate(saved_groups):
            check_torch_flags(group, g)
        dropped = {"params", *TORCH_ADAMW_FLAGS, *IMPLEMENTATION_KEYS}
        hyper = [{k: v for k, v in group.items() if k not in dropped} for group in saved_groups]
        for g in range(len(hyper)):
            group_config(hyper, g, self.optim)
        steps = {float(s["step"]) for s in saved.values()}
        if len(steps) > 1:
            raise ValueError(f"the state dict's parameters have different step counts {sorted(steps)}: the "
                             "engine keeps one step count for all of them")
        params = [p for group in self.param_groups for p in group["params"]]
        values: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]] = []
        for index, p in enumerate(params):
            if p not in self._slot:
                continue
            entry = saved.get(index, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in entry and tuple(entry[name].shape) != tuple(p.shape):
                    raise ValueError(f"the state dict's {name} of parameter {index} has shape "
                                     f"{tuple(entry[name].shape)}, the parameter {tuple(p.shape)}")
            values.append((p, entry.get("exp_avg"), entry.get("exp_avg_sq")))
        for p, exp_avg, exp_avg_sq in values:  # a parameter torch never stepped starts from zero moments
            self._write_owned(self.exp_avg, p, torch.zeros(p.shape) if exp_avg is None else exp_avg)
            self._write_owned(self.exp_avg_sq, p, torch.zeros(p.shape) if exp_avg_sq is None else exp_avg_sq)
        self.step_count = int(steps.pop()) if steps else 0
        for group, new in zip(self.param_groups, hyper):
            params_of_group = group["params"]
            group.clear()
            group.update(new, params=params_of_group)

    def check_replicas(self) -> None:
        """Raise RuntimeError naming the first bucket, frozen parameter or (with broadcast_buffers)
        buffer whose values differ between ranks (bit-exact checksum, one all-reduce; virtual ranks
        share one replica)."""
        self.wait_weights()
        named = [(f"replica bucket {b.index} ({b.names[0]} ... {b.names[-1]})", b.replica) for b in self.buckets]
        named += [(f"frozen parameter {n}", p.detach()) for n, p in self.module.named_parameters()
                  if p not in self._slot]
        if self.broadcast_buffers:
            named += [(f"buffer {n}", t) for n, t in self.module.named_buffers()]
        sums = []
        for _, t in named:
            bits = _as_int(t.reshape(-1)).to(torch.int64)
            pos = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521
            sums += [bits.sum(), (bits * pos).sum()]
        same = self.world.agree(torch.stack(sums).cpu())
        for i, (name, _) in enumerate(named):
            if not bool(same[2 * i: 2 * i + 2].all()):
                raise RuntimeError(f"{name} differs between ranks")

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
        """model.state_dict() with the fp32 master weights in place of the trainable parameters'
        compute-dtype copies: every key (tied aliases share one tensor), whole, on the CPU; frozen
        parameters and buffers as they are. Collective: every rank calls it and gets all of it.
        model.state_dict() itself gives the compute-dtype replica (under qWD one codec error
        behind the master), not the weights being trained."""
        masters = self._gather(self.master)
        return {name: masters[t] if t in masters else t.detach().cpu().clone()
                for name, t in self.module.state_dict(keep_vars=True).items()}

    def save_safetensors(self, path: str | Path) -> None:
        """Write full_state_dict() as a safetensors file (the first rank writes; collective), as
        safetensors.torch.save_model writes an unwrapped model holding the fp32 masters: tied aliases
        once (the alphabetically first name kept, the others named in the metadata). Load it with
        safetensors.torch.load_model into an unwrapped model, or model.load_state_dict(
        safetensors.torch.load_file(path), strict=False) into a wrapped one (tied aliases absent).
        safetensors.torch.save_model on the wrapped model fails: the parameters are views into flat
        buckets, storage that safetensors refuses to save in pieces."""
        if importlib.util.find_spec("safetensors") is None:
            raise RuntimeError("save_safetensors needs the safetensors package: pip install safetensors")
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if self.world.leader:
            names: dict[int, list[str]] = {}
            for name, t in state.items():
                names.setdefault(id(t), []).append(name)
            metadata: dict[str, str] | None = None
            for aliases in names.values():
                keep, *others = sorted(aliases)
                for name in others:
                    metadata = {**(metadata or {}), name: keep}
                    del state[name]
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
        self.world.barrier()

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
    def _reduce(self) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """This step's averaged fp32 gradient shards ([owned rank][bucket], as self.master) and
        their global norm; the reduction finishes once per step (clip_grad_norm_ or step())."""
        if self._reduced is not None:
            return self._reduced
        self._check_parameters()
        world = self.world
        if not world.defers_gradients:
            self._launch_ready(force=True)  # buckets holding params that backward never reached
            self._next_launch = 0
        for b in self.buckets:
            self._check_gradient_unchanged(b)
        per_bucket = [world.gradient_shards(b) for b in self.buckets]  # [bucket][owned rank]
        for b, shards in zip(self.buckets, per_bucket):
            for r, g in zip(world.owned, shards):
                g[b.valid_in_shard(r):] = 0  # codec noise must not leak into the padding
        grads = [list(row) for row in zip(*per_bucket)]  # [owned rank][bucket], as self.master
        # Each rank's partial sum as one real rank computes it, then the sum over all ranks.
        partials = [torch.stack([g.pow(2).sum() for g in row]).sum() for row in grads]
        self._reduced = (grads, world.sum_over_ranks(partials).sqrt())
        return self._reduced

    def _clear_grad_buffers(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            b.ready.clear()
            b.grad_version = None
            for i, p in enumerate(b.params):
                p.grad = b.param_view(b.grad, i)  # in case someone set .grad = None

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        error = self.world.gradient_error()
        if error is not None:
            raise RuntimeError(error)
        bucket, i = self._slot[p]
        if self._reduced is not None:
            raise RuntimeError(f"gradient of {bucket.names[i]} arrived after clip_grad_norm_() finished this "
                               "step's reduction: call it after the last backward, right before step()")
        view = bucket.param_view(bucket.grad, i)
        if p.grad.data_ptr() != view.data_ptr():  # .grad was reset to None: autograd made a new one
            view.copy_(p.grad)
            p.grad = view
        bucket.grad_version = bucket.grad._version
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
            self._check_gradient_unchanged(b)
            self.world.reduce_scatter(b, seeds.collective_seed(self.seed, self.step_count, b.index, seeds.GRADS))
            if b.grad_version is not None:
                b.grad_version = b.grad._version  # the world may have written it (virtual ranks clear it)
            b.ready.clear()
            self._next_launch += 1

    def _check_gradient_unchanged(self, b: Bucket) -> None:
        """RuntimeError (after dropping this step's reductions, on every rank alike) when the
        gradient buffer changed in place after backward finished with it: the change would be lost
        (already sent) or race with the reduction."""
        if b.grad_version is None or b.grad._version == b.grad_version:
            return
        self._refuse(
            f"the gradients of bucket {b.index} ({b.names[0]} ... {b.names[-1]}) were changed in place after "
            "backward (torch.nn.utils.clip_grad_norm_ or a GradScaler on the wrapped model?): the engine sends "
            "gradients during backward, so p.grad holds this rank's unreduced gradient and a change there is "
            "lost. Use engine.clip_grad_norm_(max_norm) before step(), or grad_clip=...")

    def _refuse(self, message: str) -> NoReturn:
        """Drop this step's gradients (reductions in flight completed, as on every rank alike) and
        raise RuntimeError(message): the next step starts clean once the cause is fixed."""
        self.zero_grad()
        raise RuntimeError(f"{message}; this step's gradients were dropped")

    def _check_parameters(self) -> None:
        """Refuse the step (RuntimeError naming the parameter) when the model no longer matches what
        the engine laid out: a parameter whose requires_grad changed, whose storage or .grad was replaced, or a
        group whose params changed. Each would otherwise be silently untrained or undone."""
        for name, p in self.module.named_parameters():
            if p not in self._slot:
                if p.requires_grad:
                    self._refuse(
                        f"parameter {name} requires grad, but the engine did not lay it out when it was built "
                        "(it was frozen then, or was replaced or added since), so it would never be trained: "
                        "set requires_grad before wrapping and build a new ShardedDataParallel")
                continue
            if not p.requires_grad:
                self._refuse(
                    f"parameter {name} was trainable when the engine was built and is frozen now: the engine "
                    "would go on updating it (weight decay, momentum). Freeze it before wrapping and build a "
                    "new ShardedDataParallel")
            values, grad = self._storage[p]
            if p.data_ptr() != values:
                self._refuse(
                    f"parameter {name} no longer lives in the engine's bucket (p.data = ... or "
                    "load_state_dict(assign=True) after wrapping): the engine would keep training its old "
                    "values. Write weights in place, through model.load_state_dict(...)")
            if p.grad is not None and p.grad.data_ptr() != grad:
                self._refuse(
                    f"the gradient of {name} was replaced after backward (p.grad = ...): the engine reduces the "
                    "gradient backward wrote, so the new one would be ignored; use engine.clip_grad_norm_ "
                    "to clip, and leave p.grad to the engine")
        if [[id(p) for p in g["params"]] for g in self.param_groups] != self._group_params:
            self._refuse("engine.param_groups' params changed after the engine was built: its buckets "
                         "are laid out once; build a new ShardedDataParallel with the new groups")

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def _launch_weight_gather(self, k: int) -> None:
        c, b = self.comm, self.buckets[k]
        seed = seeds.collective_seed(self.seed, self.step_count, b.index, seeds.WEIGHTS)
        self._weight_work[k] = self.world.gather_weights(b, [row[k] for row in self.master], c.weights,
                                                         c.weight_spec, seed)

    @torch.no_grad()
    def _gather(self, rows: list[list[torch.Tensor]]) -> dict[nn.Parameter, torch.Tensor]:
        """{laid-out param: its whole fp32 values on the CPU} of per-(owned rank, bucket) shards
        (masters or moments). Collective."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for k, b in enumerate(self.buckets):
            flat = self.world.all_gather([row[k] for row in rows]).cpu()
            for p, offset in zip(b.params, b.offsets):
                out[p] = flat[offset: offset + p.numel()].view(p.shape).clone()
        return out

    @torch.no_grad()
    def _write_owned(self, rows: list[list[torch.Tensor]], p: nn.Parameter, value: torch.Tensor) -> None:
        """Write the whole `value` of laid-out parameter p into the owned parts of per-(owned rank,
        bucket) shards (masters or moments), in fp32."""
        b, i = self._slot[p]
        flat = value.detach().reshape(-1).to(device=rows[0][b.index].device, dtype=torch.float32)
        start, s = b.offsets[i], b.shard_numel
        for j, rank in enumerate(self.world.owned):
            lo, hi = max(start, rank * s), min(start + p.numel(), (rank + 1) * s)
            if lo < hi:
                rows[j][b.index][lo - rank * s: hi - rank * s] = flat[lo - start: hi - start]

    def _install_prefetch_hooks(self, model: nn.Module) -> None:
        """Each module owning params waits for their buckets right before its forward; whatever is
        still in flight is waited when the whole forward ends (before backward can read weights)."""
        for module in model.modules():
            owned = sorted({self._slot[p][0].index for p in module.parameters(recurse=False)
                            if p in self._slot})
            if owned:
                module.register_forward_pre_hook(lambda _m, _args, ks=tuple(owned): self.wait_weights(ks))
        model.register_forward_hook(lambda *_: self.wait_weights())

    def _install_load_hooks(self, model: nn.Module) -> None:
        """model.load_state_dict(...) after wrapping writes the loaded values into the fp32 masters
        too (in full precision), right before torch copies them into the replica: without this the
        next step would start from the old masters and undo the load. The Adam moments are kept,
        as torch.optim's are."""
        for module in model.modules():
            if any(p in self._slot for p in module.parameters(recurse=False)):
                module.register_load_state_dict_pre_hook(self._load_hook)

    def _load_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: dict[str, Any], *_: Any) -> None:
        if local_metadata.get("assign_to_params_buffers", False):
            raise RuntimeError("load_state_dict(assign=True) on a wrapped model would replace the parameters "
                               "the engine laid out in its buckets; load with assign=False")
        self.wait_weights()  # an all-gather in flight would overwrite the loaded weights
        for name, p in module._parameters.items():
            value = state_dict.get(prefix + name)
            if p in self._slot and isinstance(value, torch.Tensor) and value.shape == p.shape:
                self._write_owned(self.master, p, value)  # torch reports any mismatch itself

    # ---- buffers ------------------------------------------------------------------------------
    def _sync_buffers(self) -> None:
        """Every rank takes the first rank's persistent buffers (broadcast_buffers): one broadcast
        per dtype on real ranks; on virtual ranks the values rank 0's block left (_buffers_leave)."""
        if not self._persistent:
            return
        if self.world.defers_gradients:
            for t, first in zip(self._persistent, self._rank_buffers["first"]):
                t.copy_(first)
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in self._persistent:
            by_dtype.setdefault(t.dtype, []).append(t)
        flats = [torch.cat([t.reshape(-1) for t in ts]) for ts in by_dtype.values()]
        self.world.broadcast_(flats)
        for ts, flat in zip(by_dtype.values(), flats):
            offset = 0
            for t in ts:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()

    @torch.no_grad()
    def _buffers_enter(self, rank: int) -> None:
        """Virtual ranks share one model, so each rank's forward would see the buffers the ranks
        before it updated. As on real ranks (where every rank starts the step from the first rank's
        broadcast buffers), every virtual rank starts from the buffers of the step's start."""
        if not (self._persistent and self.world.defers_gradients):
            return
        if rank == 0:
            self._rank_buffers["start"] = [t.clone() for t in self._persistent]
        else:
            for t, start in zip(self._persistent, self._rank_buffers["start"]):
                t.copy_(start)

    @torch.no_grad()
    def _buffers_leave(self, rank: int) -> None:
        if self._persistent and self.world.defers_gradients and rank == 0:
            self._rank_buffers["first"] = [t.clone() for t in self._persistent]

    def _check_same_layout(self) -> None:
        """Raise ValueError unless every rank has the same params, buckets, groups and comm config:
        ranks that disagree would otherwise hang or exchange garbage in the first size-dependent
        collective."""
        groups = [[repr(g[k]) for k in ("lr", "betas", "eps", "weight_decay")] for g in self.param_groups]
        layout = [[[n, list(p.shape), str(p.dtype)] for b in self.buckets for n, p in zip(b.names, b.params)],
                  [[len(b.params), b.shard_numel, b.group] for b in self.buckets],
                  json.loads(json.dumps(self.comm.to_dict())), groups, self.broadcast_buffers]
        digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).digest()
        h = int.from_bytes(digest[:7], "little")  # 56 bits: fits int64 with room for the negation
        if not bool(self.world.agree(torch.tensor([h], dtype=torch.int64)).all()):
            raise ValueError("ranks disagree on the model's parameters (names, shapes, dtypes), the bucket "
                             "layout, the parameter groups or the CommConfig: build the same model with the "
                             "same settings on every rank")


def _persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers model.state_dict() holds (each once): running statistics and the like. The
    non-persistent ones are derived from the configuration (RoPE tables, masks) and stay as built."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def validate_engine(model: nn.Module, world: World, config: CommConfig, grad_clip: float | None) -> None:
    """Every check that needs no communication: raise ValueError before the first collective."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None (off), got {grad_clip!r}")
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype not in PARAM_DTYPES:
            raise ValueError(f"parameter {name} is {p.dtype}: the engine keeps fp32 master weights and trains "
                             "fp32 and bf16 parameters (they may mix); cast it, e.g. model.float()")
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
    """The raw bits of a tensor as a same-width signed integer tensor."""
    if t.dtype == torch.bool:
        return t.to(torch.int8)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
