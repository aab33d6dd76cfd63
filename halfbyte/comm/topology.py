"""Nodes x GPUs-per-node layout of the ranks, and the process groups of each link class.

Global rank r = node * L + local_rank (torchrun's order). The 2-D DeviceMesh has dims
("inter", "intra"): `intra_group` holds the L ranks of one node, `inter_group` the M ranks with the
same local rank on every node. Nodes can be emulated on one host (4 local processes as 2 x 2) to
exercise the two-level paths; emulated nodes must nest inside the physical ones, so that traffic
labelled intra really stays on a host.

inter_backend: build the inter-node groups with another backend than the default group's, e.g.
nccl intra + gloo inter (CPU tensors on gloo: the caller must move buffers; the collectives here
use one device per topology, so this only suits experiments), or gloo default + nccl inter. The
mesh itself always uses the default backend; `inter_group` is the override when given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from halfbyte.comm.accounting import CommStats


@dataclass
class Topology:
    rank: int
    world_size: int
    nodes: int
    gpus_per_node: int
    node: int
    local_rank: int
    device: torch.device
    world_group: dist.ProcessGroup
    intra_group: dist.ProcessGroup
    inter_group: dist.ProcessGroup
    mesh: DeviceMesh
    stats: CommStats = field(default_factory=CommStats)

    @property
    def backend(self) -> str:
        return dist.get_backend(self.world_group)

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.gpus_per_node} rank(s) per node, {self.backend}, {self.device}"


def divisors(n: int) -> list[int]:
    """The valid choices for a group size that must divide n (for error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def build_topology(gpus_per_node: int | None = None, *, device: torch.device | str | None = None,
                   inter_backend: str | None = None) -> Topology:
    """Topology of the initialized default process group.

    gpus_per_node (L): ranks per (possibly emulated) node; None: LOCAL_WORLD_SIZE from the launcher,
    else the whole world (one node). device: where the collectives' buffers live; None: the current
    CUDA device under nccl, else CPU.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_topology needs an initialized default process group "
                           "(halfbyte.comm.launch.init_process_group_from_env)")
    world, rank = dist.get_world_size(), dist.get_rank()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    L = local_world if gpus_per_node is None else gpus_per_node
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"gpus_per_node must be a positive integer, got {L!r}")
    if world % L:
        raise ValueError(f"gpus_per_node ({L}) must divide the world size ({world}): "
                         f"choose one of {divisors(world)}")
    if local_world % L or (local_world != world and world % local_world):
        raise ValueError(
            f"gpus_per_node ({L}) must divide the launcher's LOCAL_WORLD_SIZE ({local_world}): an "
            f"emulated node cannot span two real hosts (set gpus_per_node={local_world} or a divisor)"
        )
    if "LOCAL_RANK" in os.environ and int(os.environ["LOCAL_RANK"]) != rank % local_world:
        raise ValueError(f"rank {rank} has LOCAL_RANK {os.environ['LOCAL_RANK']}, expected "
                         f"{rank % local_world}: ranks must be numbered node * L + local_rank")
    backend = dist.get_backend()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    M = world // L
    mesh = init_device_mesh(device.type, (M, L), mesh_dim_names=("inter", "intra"))
    inter_group = mesh.get_group("inter")
    if inter_backend is not None and inter_backend != backend:
        inter_group = _groups_with_backend(M, L, inter_backend, rank)
    return Topology(
        rank=rank, world_size=world, nodes=M, gpus_per_node=L, node=rank // L, local_rank=rank % L,
        device=device, world_group=dist.group.WORLD, intra_group=mesh.get_group("intra"),
        inter_group=inter_group, mesh=mesh,
    )


def _groups_with_backend(M: int, L: int, backend: str, rank: int) -> dist.ProcessGroup:
    # Every rank must create every group, in the same order; it keeps the one it belongs to.
    mine = None
    for local in range(L):
        group = dist.new_group([node * L + local for node in range(M)], backend=backend)
        if rank % L == local:
            mine = group
    assert mine is not None
    return mine
