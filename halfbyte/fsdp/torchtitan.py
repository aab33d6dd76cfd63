"""halfbyte in a torchtitan (0.3.0) job: wrap the model spec's parallelize_fn.

torchtitan has no communication hook of its own. Its model converters run when the model is
built, before any parallelism, so they cannot reach FSDP2's collectives; the first point where the
FSDP modules exist is the end of `ModelSpec.parallelize_fn` (tensor parallelism, activation
checkpointing, compile, then fully_shard on the "fsdp" mesh). `with_halfbyte` returns the config
with that function wrapped: it runs torchtitan's own parallelization and then quantize_comms on
the model it returns (still on the meta device; halfbyte allocates its replicas lazily, at the
first all-gather). Pipeline parallelism calls the same parallelize_fn per stage, so stages are
covered too.

From torchtitan's command line, this module is itself a config registry:

    torchrun --nproc_per_node=2 -m torchtitan.train \\
        --module halfbyte.fsdp.torchtitan --config llama3_debugmodel_sdp4bit

Needs `pip install halfbyte[torchtitan]`; torchtitan 0.3.0 imports
torch.distributed.fsdp.DataParallelMeshDims, which torch 2.11 lacks (2.13 has it), and its models
import triton. See docs/fsdp.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import topology_from_mesh
from halfbyte.fsdp import internals
from halfbyte.fsdp.quantize import QuantizedComms, quantize_comms

#: Root forwards between two log lines of the bytes sent (torchtitan's metrics know nothing of them).
LOG_EVERY = 10


def with_halfbyte(config: Any, comm: CommConfig | str, *, seed: int = 0,
                  gpus_per_node: int | None = None,
                  handles: list[QuantizedComms] | None = None) -> Any:
    """A copy of a torchtitan Trainer.Config whose model spec installs halfbyte's collectives.

    comm: a CommConfig or a preset name; on a single (possibly emulated) node two-level gradients
    run one level (CommConfig.for_nodes), and the log says so. gpus_per_node: world ranks per node
    (None: the launcher's LOCAL_WORLD_SIZE). handles: a list that receives each model part's
    QuantizedComms (stats, check_replicas), for callers that drive the Trainer themselves.
    """
    comm = CommConfig.preset(comm) if isinstance(comm, str) else comm
    spec = config.model_spec
    wrapped = halfbyte_parallelize_fn(spec.parallelize_fn, comm, seed=seed, gpus_per_node=gpus_per_node,
                                      handles=handles)
    return dataclasses.replace(config, model_spec=dataclasses.replace(spec, parallelize_fn=wrapped))


def halfbyte_parallelize_fn(parallelize_fn: Callable[..., nn.Module], comm: CommConfig, *, seed: int = 0,
                            gpus_per_node: int | None = None,
                            handles: list[QuantizedComms] | None = None) -> Callable[..., nn.Module]:
    """parallelize_fn followed by quantize_comms on the model it returns (same signature)."""

    @functools.wraps(parallelize_fn)
    def parallelize(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        model = parallelize_fn(model, *args, **kwargs)
        handle = install(model, comm, seed=seed, gpus_per_node=gpus_per_node)
        if handles is not None:
            handles.append(handle)
        return model

    return parallelize


def install(model: nn.Module, comm: CommConfig, *, seed: int = 0,
            gpus_per_node: int | None = None) -> QuantizedComms:
    """quantize_comms over the mesh torchtitan sharded `model` on, with the single-node rule, and
    a forward hook on the root that logs the bytes sent every LOG_EVERY steps."""
    from torchtitan.tools.logging import logger

    groups = [g for _, m in internals.fsdp_modules(model) for g in internals.param_groups(m)]
    if not groups:
        raise ValueError("halfbyte: torchtitan's parallelize_fn applied no fully_shard (data parallel "
                         "degree 1?), so there is no FSDP2 communication to quantize")
    topo = topology_from_mesh(internals.shard_mesh(groups[0]), gpus_per_node)
    comm, note = comm.for_nodes(topo.nodes)
    if note:
        logger.info(f"halfbyte: {note}")
    handle = quantize_comms(model, comm, topo, seed=seed)
    logger.info(f"halfbyte: {comm.describe()} on {topo.describe()}, "
                f"{len(handle.module_names)} FSDP modules")
    forwards = [0]

    def log_bytes(_module: nn.Module, _args: Any) -> None:
        forwards[0] += 1
        if forwards[0] % LOG_EVERY == 0:
            s = handle.stats.summary()
            logger.info(f"halfbyte: {forwards[0]} forwards, sent {s['sent_MB']:.1f} MB "
                        f"(intra {s['intra_MB']:.1f}, inter {s['inter_MB']:.1f}); uncompressed "
                        f"FSDP2 would have sent {s['baseline_MB']:.1f} MB")

    model.register_forward_pre_hook(log_bytes)
    return handle


def llama3_debugmodel_sdp4bit() -> Any:
    """torchtitan's llama3_debugmodel with sdp4bit (config registry entry for --config), on
    torchtitan's partial_dtensor path (fully_shard over the "fsdp" mesh: the one tested; its default
    spmd_types path shards on the full SPMD mesh). Compare with the plain debug model run with
    --parallelism.spmd_backend partial_dtensor."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = llama3_debugmodel()
    config.parallelism.spmd_backend = "partial_dtensor"
    return with_halfbyte(config, "sdp4bit")
