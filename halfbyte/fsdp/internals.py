"""Every FSDP2 internal halfbyte reads, in one place, for torch 2.11 and 2.13.

FSDP2's public seam (`FSDPModule.set_custom_all_gather` / `set_custom_reduce_scatter`) hands a comm
object flat buffers only. qWD also needs, per FSDP parameter group, the fp32 sharded parameters
(the all-gather input is their param_dtype cast), their version counters (to tell a re-gather of
unchanged weights), and the layout of the flat buffer (to save the replica by parameter name). Those
live on private objects: `FSDPState._fsdp_param_group` (torch 2.11) / `_fsdp_param_groups` (a list,
torch 2.13), `FSDPParamGroup.fsdp_params`, `FSDPParam._sharded_param_data` (the padded sharded
parameter, 1-D, orig dtype), `padded_sharded_param_size`, `fsdp_placement`, `_orig_size`,
`_module_info`. Both versions name them alike (checked against their sources); if a later torch
renames one, the error surfaces here, at `quantize_comms`, not mid-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
from torch.distributed.tensor import DTensor, Replicate


def fsdp_modules(model: nn.Module) -> list[tuple[str, FSDPModule]]:
    """(fqn, module) of every fully_shard-ed module of model, in model.modules() order (the same on
    every rank, so it numbers the parameter groups consistently)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def param_groups(module: FSDPModule) -> list[Any]:
    """The FSDPParamGroup(s) of one FSDP module: none when it owns no parameters of its own."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch 2.13: a list
    if groups is None:  # torch 2.11: one optional group
        group = state._fsdp_param_group
        groups = [group] if group is not None else []
    return list(groups)


def mesh_kind(group: Any) -> str:
    """'fsdp' for plain 1-D sharding; 'hsdp' / 'replicate' when FSDP also all-reduces (its own,
    uncompressed all-reduce that halfbyte would neither quantize nor count)."""
    kind = type(group.mesh_info).__name__
    return {"FSDPMeshInfo": "fsdp", "HSDPMeshInfo": "hsdp", "DDPMeshInfo": "replicate"}.get(kind, kind)


def shard_group(group: Any) -> dist.ProcessGroup:
    return group.mesh_info.shard_process_group


def shard_mesh(group: Any) -> Any:
    return group.mesh_info.mesh


def reshards_to_smaller_mesh(group: Any) -> bool:
    """reshard_after_forward=<int>: the backward re-gather then runs over another group with
    another layout (FSDP's post-forward mesh)."""
    info = group.post_forward_mesh_info
    return info is not None and info is not group.mesh_info and info != group.mesh_info


def reshards_after_forward(group: Any) -> bool:
    """Whether the group frees its unsharded parameters after forward, so that backward all-gathers
    them again (FSDP2 leaves the root unsharded unless reshard_after_forward was given for it)."""
    return group.post_forward_mesh_info is not None


def installed_comms(group: Any) -> tuple[Any, Any]:
    return group._all_gather_comm, group._reduce_scatter_comm


def is_default_comm(comm: Any) -> bool:
    """True for FSDP's own plain comms (not symmetric-memory, process-group allocation or custom)."""
    return type(comm) in (DefaultAllGather, DefaultReduceScatter)


def gradient_divide_factor(group: Any) -> float | None:
    return group.gradient_divide_factor


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter sits in its group's flat all-gather buffer (per rank: `numel` values
    from `offset`), and how its rows reassemble into the full (unsharded) tensor."""

    fqn: str
    offset: int
    numel: int                       # padded sharded numel
    padded_size: tuple[int, ...]     # padded sharded size
    orig_size: tuple[int, ...]       # unsharded size (TP-local when the parameter is a TP DTensor)
    shard_dim: int


def param_slots(group: Any, module_names: dict[int, str]) -> list[ParamSlot]:
    """The group's parameters in all-gather order with their FQNs (from the caller's
    id(module) -> name map, so they are known before FSDP's lazy init names them)."""
    slots, offset = [], 0
    for p in group.fsdp_params:
        info = p._module_info
        prefix = module_names[id(info.module)]
        numel = p.padded_sharded_param_size.numel()
        slots.append(ParamSlot(fqn=f"{prefix}.{info.param_name}" if prefix else info.param_name,
                               offset=offset, numel=numel,
                               padded_size=tuple(p.padded_sharded_param_size),
                               orig_size=tuple(p._orig_size), shard_dim=p.fsdp_placement.dim))
        offset += numel
    return slots


def uses_all_gather_extension(group: Any) -> bool:
    """A parameter whose local tensor defines fsdp_pre_all_gather (e.g. torchao float8): its
    all-gather input is not its values."""
    return any(hasattr(p.sharded_param._local_tensor, "fsdp_pre_all_gather") for p in group.fsdp_params)


def orig_dtypes(group: Any) -> set[torch.dtype]:
    return {p.sharded_param.dtype for p in group.fsdp_params}


def all_gather_dtype(group: Any) -> torch.dtype:
    """The dtype FSDP all-gathers a (uniform-dtype) group in: the mixed-precision param_dtype, else
    the parameters' own. Read from the policy, so it is known before FSDP's lazy init."""
    orig = group.fsdp_params[0].sharded_param.dtype
    param_dtype = group.mp_policy.param_dtype
    return param_dtype if param_dtype is not None and orig.is_floating_point else orig


def master_shard(group: Any, device: torch.device) -> torch.Tensor:
    """This rank's padded sharded parameters in their original dtype (fp32 masters), concatenated
    in all-gather order: the tensor whose param_dtype cast FSDP hands the all-gather."""
    parts = [p._sharded_param_data for p in group.fsdp_params]
    return torch.cat([t.to(device, non_blocking=True) for t in parts])


def shard_versions(group: Any) -> tuple[tuple[int, int, int], ...]:
    """(storage address, version of the DTensor parameter, version of its padded local buffer) of
    every sharded parameter of the group. An in-place write through the DTensor parameter
    (optimizer.step, load_state_dict, copy_) bumps the parameter's own counter (the local tensor's
    stays: DTensor runs the local op below autograd); one through the local tensor or the padded
    buffer bumps the buffer's (views share their base's counter). `_apply` (model.to, to_empty)
    replaces the buffer, which changes the address."""
    return tuple((p._sharded_param_data.untyped_storage().data_ptr(), p.sharded_param._version,
                  p._sharded_param_data._version) for p in group.fsdp_params)


def as_replicated(tensor: torch.Tensor, fsdp_param: Any) -> torch.Tensor:
    """A full (dp-unsharded) tensor as what every dp rank holds: the plain tensor, or for a tensor-
    parallel parameter a DTensor replicated over dp and sharded over tp like the parameter."""
    sharded = fsdp_param.sharded_param
    if not fsdp_param.is_dtensor:
        return tensor
    placements = (Replicate(), *sharded.placements[1:])
    return DTensor.from_local(tensor, sharded.device_mesh, placements, run_check=False)
