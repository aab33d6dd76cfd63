"""Nodes x GPUs-per-node layout of the ranks, and the process groups of each link class.

Global rank r = node * L + local_rank (torchrun's order). The 2-D DeviceMesh has dims
("inter", "intra"): `intra_group` holds the L ranks of one node, `inter_group` the M ranks with the
same local rank on every node. Nodes can be emulated on one host (4 local processes as 2 x 2) to
exercise the two-level paths; emulated nodes must nest inside the physical ones, so that traffic
labelled intra really stays on a host.

`build_topology` spans the whole world; `topology_from_mesh` spans one data-parallel group of a
larger DeviceMesh (FSDP2's shard dimension next to tensor parallelism): its "world" is that group,
and its nodes are the group's members that share a (possibly emulated) host.
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


def build_topology(gpus_per_node: int | None = None, *,
                   device: torch.device | str | None = None) -> Topology:
    """Topology of the initialized default process group.

    gpus_per_node (L): ranks per (possibly emulated) node; None: LOCAL_WORLD_SIZE from the launcher,
    else the whole world (one node). device: where the collectives' buffers live; None: the current
    CUDA device under nccl, else CPU.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_topology needs an initialized default process group "
                           "(halfbyte.comm.launch.init_process_group_from_env)")
    world, rank = dist.get_world_size(), dist.get_rank()
    L = _ranks_per_node(gpus_per_node, world, rank)
    device = _default_device(device)
    M = world // L
    mesh = init_device_mesh(device.type, (M, L), mesh_dim_names=("inter", "intra"))
    return Topology(
        rank=rank, world_size=world, nodes=M, gpus_per_node=L, node=rank // L, local_rank=rank % L,
        device=device, world_group=dist.group.WORLD, intra_group=mesh.get_group("intra"),
        inter_group=mesh.get_group("inter"), mesh=mesh,
    )


def topology_from_mesh(mesh: DeviceMesh, gpus_per_node: int | None = None, *,
                       device: torch.device | str | None = None) -> Topology:
    """Topology of this rank's group in a 1-D data-parallel DeviceMesh. Collective over the world.

    mesh: the data-parallel (sub-)mesh FSDP2 shards over, e.g. `world_mesh["dp"]` of a ("dp", "tp")
    mesh. Its group is the topology's world: topology rank r = the group's rank r, which owns FSDP
    shard r. gpus_per_node: world ranks per (possibly emulated) node, as in build_topology; a
    global rank g sits on node g // gpus_per_node. The group's members on one node form its intra
    group, so with tp inner on a node of 8 GPUs and tp = 2 each node holds L = 4 members of every
    dp group. Every dp group must hold the same number of members on each of its nodes, listed
    node by node (the usual dp-outer, tp-inner layout does).

    Every rank learns every dp group's members (one all_gather_object over the world) and builds
    one DeviceMesh (groups, inter, intra) over all of them, so that each rank creates every
    process group in the same order, as torch.distributed requires.
    """
    if not dist.is_initialized():
        raise RuntimeError("topology_from_mesh needs an initialized default process group")
    if mesh.ndim != 1:
        raise ValueError(f"topology_from_mesh needs the 1-D data-parallel mesh FSDP2 shards over, "
                         f"got a {mesh.ndim}-D mesh {mesh.mesh_dim_names}: pass mesh['dp'] (for "
                         "several data-parallel dims, their flattened mesh)")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = _ranks_per_node(gpus_per_node, world, rank)
    group = mesh.get_group()
    members = dist.get_process_group_ranks(group)
    every: list[list[int] | None] = [None] * world
    dist.all_gather_object(every, members)
    groups = sorted({tuple(g) for g in every if g is not None})
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or sum(map(len, groups)) != world:
        raise ValueError(f"the data-parallel groups must partition the world into equal groups, got "
                         f"{[list(g) for g in groups]}")
    layouts = [_node_layout(list(g), per_node) for g in groups]
    if len(set(layouts)) != 1:
        raise ValueError(f"the data-parallel groups {[list(g) for g in groups]} lie differently on the "
                         f"nodes of {per_node} ranks: every group needs the same nodes x ranks")
    M, L = layouts[0]
    device = _default_device(device)
    grid = torch.tensor(groups, dtype=torch.int64).view(len(groups), M, L)
    full = DeviceMesh(device.type, grid, mesh_dim_names=("groups", "inter", "intra"))
    r = members.index(rank)
    return Topology(
        rank=r, world_size=len(members), nodes=M, gpus_per_node=L, node=r // L, local_rank=r % L,
        device=device, world_group=group, intra_group=full.get_group("intra"),
        inter_group=full.get_group("inter"), mesh=full["inter", "intra"],
    )


def _node_layout(members: list[int], per_node: int) -> tuple[int, int]:
    """(nodes M, members per node L) of one group whose member i must sit on its node i // L."""
    nodes = [g // per_node for g in members]
    distinct = sorted(set(nodes), key=nodes.index)
    M = len(distinct)
    L = len(members) // M
    expected = [distinct[i // L] for i in range(len(members))]
    if M * L != len(members) or nodes != expected:
        raise ValueError(
            f"data-parallel group {members} on nodes of {per_node} ranks is {nodes} (node of each "
            "member): each node must hold the same number of members, listed node by node; put "
            "tensor parallelism inside a node (the last mesh dim) or pass gpus_per_node")
    return M, L


def _ranks_per_node(gpus_per_node: int | None, world: int, rank: int) -> int:
    """Validated world ranks per (possibly emulated) node; None: the launcher's LOCAL_WORLD_SIZE."""
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
    return L


def _default_device(device: torch.device | str | None) -> torch.device:
    """The collectives' device: the given one, else the current CUDA device under nccl, else CPU."""
    if device is None:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(device)
