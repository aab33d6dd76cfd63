"""Flat buckets: parameters and their gradients laid out contiguously, so one collective moves a
whole bucket and each rank owns one equal, group-aligned shard of it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

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
    replica: torch.Tensor  # [padded_numel], the model's dtype; param .data are views into it
    grad: torch.Tensor  # [padded_numel], the model's dtype; param .grad are views into it
    ready: set[int] = field(default_factory=set)  # params whose gradient is final this step

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


def plan_buckets(sizes: list[int], bucket_numel: int) -> list[list[int]]:
    """Group parameter indices (already in bucket order) into runs of >= bucket_numel values; a
    parameter larger than bucket_numel closes its bucket by itself."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    plan: list[list[int]] = [[]]
    filled = 0
    for i, n in enumerate(sizes):
        plan[-1].append(i)
        filled += n
        if filled >= bucket_numel:
            plan.append([])
            filled = 0
    return [b for b in plan if b]


def shard_numel_for(numel: int, world_size: int, alignment: int) -> int:
    """Smallest multiple of `alignment` with world_size * shard >= numel (at least one alignment)."""
    per_rank = -(-numel // world_size)
    return max(1, -(-per_rank // alignment)) * alignment


def build_buckets(model: nn.Module, bucket_numel: int, world_size: int,
                  alignment: int) -> list[Bucket]:
    """Move every trainable parameter of `model` into flat buckets, in reverse registration order
    (roughly the order backward produces gradients, so early buckets fill first).

    After this, each param's .data is a view into its bucket's replica and its .grad a view into
    the bucket's gradient buffer: autograd accumulates straight into the flat buffer.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied params once
    if not named:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for _, p in named}
    devices = {p.device for _, p in named}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError("all trainable parameters must share one dtype and one device, got "
                         f"dtypes {sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    named.reverse()

    buckets = []
    for index, members in enumerate(plan_buckets([p.numel() for _, p in named], bucket_numel)):
        names = [named[i][0] for i in members]
        params = [named[i][1] for i in members]
        offsets, numel = [], 0
        for p in params:
            offsets.append(numel)
            numel += p.numel()
        shard = shard_numel_for(numel, world_size, alignment)
        bucket = Bucket(index, names, params, offsets, numel, shard, world_size,
                        replica=torch.zeros(shard * world_size, dtype=dtype, device=device),
                        grad=torch.zeros(shard * world_size, dtype=dtype, device=device))
        with torch.no_grad():
            for i, p in enumerate(params):
                view = bucket.param_view(bucket.replica, i)
                view.copy_(p.data)
                p.data = view
                p.grad = bucket.param_view(bucket.grad, i)
        buckets.append(bucket)
    return buckets
