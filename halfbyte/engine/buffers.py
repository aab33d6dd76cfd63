"""Flat buckets: parameters and their gradients laid out contiguously, so one collective moves a
whole bucket and each rank owns one equal, group-aligned shard of it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import nn


def register_grad_ready_hooks(params: list[nn.Parameter],
                              on_ready: Callable[[nn.Parameter], None]) -> list:
    """Call the bound method `on_ready(p)` once p's gradient is accumulated; return the handles.

    The hooks hold the method's object weakly. A parameter is also owned by autograd's C++ graph,
    which Python's garbage collector cannot traverse, so a strong cycle param -> hook -> engine ->
    param would keep the engine (replica, master weights, optimizer state) alive after `del`."""
    method = weakref.WeakMethod(on_ready)

    def hook(p: nn.Parameter) -> None:
        bound = method()
        if bound is not None:
            bound(p)

    return [p.register_post_accumulate_grad_hook(hook) for p in params]


@dataclass
class Bucket:
    """A run of parameters stored back to back in one flat replica and one flat gradient buffer.

    numel:       values of real parameters; the rest of `padded_numel` is zero padding at the end.
    shard_numel: padded_numel / world_size, a multiple of the alignment; rank r owns
                 [r * shard_numel, (r + 1) * shard_numel).
    """

    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    shard_numel: int
    world_size: int
    replica: torch.Tensor  # [padded_numel], the params' dtype; param .data are views into it
    grad: torch.Tensor  # [padded_numel], the params' dtype; param .grad are views into it
    group: int = 0  # the parameter group (engine.param_groups index) all its params belong to
    ready: set[int] = field(default_factory=set)  # params whose gradient is final this step
    # grad._version when the engine last saw the gradient buffer (after backward accumulated into
    # it, or the engine wrote it); None until backward reaches the bucket this step. A different
    # version later means someone changed the gradients in place behind the engine's back.
    grad_version: int | None = None

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    def shard(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s shard of a [padded_numel] buffer (a view)."""
        return flat[rank * self.shard_numel : (rank + 1) * self.shard_numel]

    def valid_in_shard(self, rank: int) -> int:
        """How many leading values of rank `rank`'s shard are real parameters (not padding)."""
        return max(0, min(self.shard_numel, self.numel - rank * self.shard_numel))

    def param_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i] : self.offsets[i] + p.numel()].view(p.shape)


def plan_buckets(sizes: list[int], bucket_numel: int, keys: list[Hashable] | None = None) -> list[list[int]]:
    """Group parameter indices (already in bucket order) into buckets of one key each (a parameter
    group and dtype: what one collective and one optimizer call can share). Each key fills its own
    open bucket; a bucket closes once it holds >= bucket_numel values (a larger parameter closes
    its bucket by itself), the open ones close at the end. Buckets are ordered by their last
    member, which is the order backward completes them, so launching in index order never waits
    on a bucket that is still filling."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    keys = keys if keys is not None else [None] * len(sizes)
    plan: list[list[int]] = []
    open_: dict[Hashable, list[int]] = {}
    filled: dict[Hashable, int] = {}
    for i, (n, key) in enumerate(zip(sizes, keys)):
        open_.setdefault(key, []).append(i)
        filled[key] = filled.get(key, 0) + n
        if filled[key] >= bucket_numel:
            plan.append(open_.pop(key))
            filled[key] = 0
    return sorted(plan + list(open_.values()), key=lambda members: members[-1])


def shard_numel_for(numel: int, world_size: int, alignment: int) -> int:
    """Smallest multiple of `alignment` with world_size * shard >= numel (at least one alignment)."""
    per_rank = -(-numel // world_size)
    return max(1, -(-per_rank // alignment)) * alignment


def build_buckets(model: nn.Module, bucket_numel: int, world_size: int, alignment: int,
                  groups: dict[nn.Parameter, int] | None = None) -> list[Bucket]:
    """Move every trainable parameter of `model` into flat buckets, in reverse registration order
    (roughly the order backward produces gradients, so early buckets fill first), one parameter
    group (`groups`: param -> group index, default all 0) and one dtype per bucket.

    After this, each param's .data is a view into its bucket's replica and its .grad a view into
    the bucket's gradient buffer: autograd accumulates straight into the flat buffer.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied params once
    if not named:
        raise ValueError("the model has no trainable parameters")
    devices = {p.device for _, p in named}
    if len(devices) != 1:
        raise ValueError(f"all trainable parameters must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    named.reverse()
    group_of = [0 if groups is None else groups[p] for _, p in named]

    buckets = []
    keys = [(g, p.dtype) for g, (_, p) in zip(group_of, named)]
    for index, members in enumerate(plan_buckets([p.numel() for _, p in named], bucket_numel, keys)):
        names = [named[i][0] for i in members]
        params = [named[i][1] for i in members]
        offsets, numel = [], 0
        for p in params:
            offsets.append(numel)
            numel += p.numel()
        shard = shard_numel_for(numel, world_size, alignment)
        dtype = params[0].dtype
        bucket = Bucket(index, names, params, offsets, numel, shard, world_size,
                        replica=torch.zeros(shard * world_size, dtype=dtype, device=device),
                        grad=torch.zeros(shard * world_size, dtype=dtype, device=device),
                        group=group_of[members[0]])
        with torch.no_grad():
            for i, p in enumerate(params):
                view = bucket.param_view(bucket.replica, i)
                view.copy_(p.data)
                p.data = view
                p.grad = bucket.param_view(bucket.grad, i)
        buckets.append(bucket)
    return buckets
