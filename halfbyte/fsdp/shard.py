"""`shard_model`: fully_shard per transformer block plus the root, then quantize_comms, so a
trainer's FSDP2 setup is one call."""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import topology_from_mesh
from halfbyte.fsdp.quantize import QuantizedComms, quantize_comms

#: Where the transformer blocks live: halfbyte's GPT (`blocks`), torchtitan's decoders
#: (`layers`), Hugging Face Llama-style models bare or behind halfbyte's HFCausalLM (`model.layers`,
#: `hf.model.layers`) and GPT-2-style ones (`transformer.h`).
BLOCK_PATHS = ("blocks", "layers", "model.layers", "hf.model.layers", "transformer.h",
               "hf.transformer.h")


def find_blocks(model: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The transformer blocks of `model`: the children of the ModuleList / ModuleDict at `path`
    (dotted), or at the first of BLOCK_PATHS that exists."""
    for candidate in [path] if path is not None else BLOCK_PATHS:
        try:
            container = model.get_submodule(candidate)
        except AttributeError:
            if path is not None:
                raise ValueError(f"the model has no submodule {path!r}") from None
            continue
        if isinstance(container, (nn.ModuleList, nn.ModuleDict)) and len(container):
            return list(container.children())
        if path is not None:
            raise ValueError(f"{path!r} is a {type(container).__name__}, not a non-empty ModuleList "
                             "or ModuleDict of blocks")
    raise ValueError(f"found no transformer blocks at any of {', '.join(BLOCK_PATHS)}: pass "
                     "blocks='<dotted path>' or a list of modules")


def shard_model(model: nn.Module, mesh: DeviceMesh | None, comm: CommConfig, *,
                gpus_per_node: int | None = None, blocks: str | Iterable[nn.Module] | None = None,
                mp_policy: MixedPrecisionPolicy | None = None, reshard_after_forward: bool = True,
                seed: int = 0) -> QuantizedComms:
    """fully_shard every block of `model` and then the root over `mesh`, and install halfbyte's
    collectives (quantize_comms). Collective.

    mesh: the 1-D data-parallel mesh (e.g. world_mesh["dp"] next to tensor parallelism); None: one
    over the whole world on the default backend's device type. gpus_per_node: world ranks per
    (possibly emulated) node, for the two-level gradient topology (see topology_from_mesh).
    blocks: a dotted path to the ModuleList/ModuleDict of blocks, the modules themselves, or None
    to look in the usual places (find_blocks). mp_policy: FSDP2's mixed precision (e.g.
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32); None: none. reshard_after_forward:
    the blocks'; the root never reshards after forward, FSDP2's own rule for a root it is left to
    choose (backward needs the root's parameters first, so freeing them would only re-gather them
    at once), given explicitly so that every rank knows each group's gathers before the first
    forward. comm must suit the node count (comm.for_nodes(topo.nodes)[0] on one node).
    """
    if mesh is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    shard_blocks(model, mesh, mp_policy or MixedPrecisionPolicy(), blocks, reshard_after_forward)
    return quantize_comms(model, comm, topology_from_mesh(mesh, gpus_per_node), seed=seed)


def shard_blocks(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
                 blocks: str | Iterable[nn.Module] | None = None, reshard_after_forward: bool = True) -> None:
    """shard_model's sharding without halfbyte's collectives (FSDP2 alone, e.g. the reference a
    quantized run is compared with): fully_shard every block, then the root (which keeps its
    parameters unsharded from forward to backward)."""
    modules = find_blocks(model, blocks) if blocks is None or isinstance(blocks, str) else list(blocks)
    for block in modules:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
