"""Per-rank bodies of the torchtitan integration tests (gloo CPU ranks, torchtitan 0.3.0).

torchtitan 0.3.0 assumes an accelerator: its ParallelDims builds meshes on
torchtitan.tools.utils.device_type, which is "cuda" on a machine without one, so the workers point
that module-level name at "cpu" before building meshes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from halfbyte.fsdp import OP_FROM_REPLICA, OP_REPLICA_INIT, QuantizedComms
from halfbyte.fsdp.torchtitan import with_halfbyte

VOCAB, DIM = 64, 32


class TinyDecoder(nn.Module):
    """The attributes torchtitan's apply_fsdp_to_decoder shards: tok_embeddings, layers (a
    ModuleDict of blocks), norm + lm_head (sharded together as one group), no weight tying."""

    enable_weight_tying = False

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                                           nn.Linear(2 * DIM, DIM)) for i in range(2)})
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = h + layer(h)
        return self.lm_head(self.norm(h))


def parallelize_tiny(model: nn.Module, *, parallel_dims, training, parallelism, compile_config,
                     ac_config, dump_folder) -> nn.Module:
    """A model spec's parallelize_fn (torchtitan's signature), sharding with torchtitan's own
    apply_fsdp_to_decoder on the "fsdp" mesh, as parallelize_llama does."""
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    apply_fsdp_to_decoder(model, parallel_dims.get_mesh("fsdp"), param_dtype=torch.float32,
                          reduce_dtype=torch.float32, pp_enabled=False)
    return model


def _parallel_dims(parallelism):
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.distributed import ParallelDims

    parallel_dims_module.device_type = "cpu"
    dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    dims.build_mesh()
    return dims


def _trainer_config(spec):
    """A Trainer.Config on torchtitan's legacy FSDP path (fully_shard over the "fsdp" mesh); its
    default spmd_types backend needs DTensor parameters on the full SPMD mesh."""
    from torchtitan.trainer import Trainer

    config = Trainer.Config(model_spec=spec)
    config.parallelism.spmd_backend = "partial_dtensor"
    return config


def tiny_decoder(presets: list[str | None], steps: int) -> dict:
    """torchtitan's ModelSpec + Trainer.Config, with_halfbyte around a parallelize_fn that uses
    torchtitan's FSDP code; plain (None) and each preset train the same steps."""
    from torchtitan.protocols.model_spec import ModelSpec

    spec = ModelSpec(name="tiny", flavor="test", model=None, parallelize_fn=parallelize_tiny,
                     pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)
    out = {}
    for preset in presets:
        handles: list[QuantizedComms] = []
        config = _trainer_config(spec)
        if preset is not None:
            config = with_halfbyte(config, preset, seed=1, gpus_per_node=1, handles=handles)
            assert config.model_spec.parallelize_fn is not parallelize_tiny
            assert spec.parallelize_fn is parallelize_tiny  # the original config is left alone
        dims = _parallel_dims(config.parallelism)
        model = config.model_spec.parallelize_fn(
            TinyDecoder(), parallel_dims=dims, training=config.training, parallelism=config.parallelism,
            compile_config=config.compile, ac_config=None, dump_folder="")
        if preset in (None, "baseline"):
            # torchtitan disables FSDP's gradient division (PREMUL_SUM(1.0)), which gloo lacks;
            # a plain SUM is the same reduction, and halfbyte's full mode passes FSDP's op through
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_force_sum_reduction_for_comms(True)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + dist.get_rank())
            x = torch.randint(VOCAB, (8, 16), generator=g)  # learn a fixed map of each token
            loss = F.cross_entropy(model(x).flatten(0, 1), (x * 7 + 3).remainder(VOCAB).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        result = {"losses": losses}
        if handles:
            (handle,) = handles
            handle.check_replicas()
            result.update(modules=handle.module_names, summary=handle.stats.summary(),
                          comm=handle.comm.describe())
        out[str(preset)] = result
    return out


def llama3_debugmodel_forward() -> dict:
    """torchtitan's llama3 debug model, parallelized on meta by its own parallelize_llama wrapped
    by with_halfbyte(sdp4bit), materialized, initialized, two forwards (FlexAttention has no CPU
    backward, so no training step here) next to the plain debug model: the first forward's logits
    are bit-identical (qWD's replica starts as an exact copy) and the second sends nothing."""
    from torchtitan.models.llama3 import parallelize_llama
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from halfbyte.fsdp.torchtitan import llama3_debugmodel_sdp4bit

    assert llama3_debugmodel_sdp4bit().model_spec.parallelize_fn.__wrapped__ is parallelize_llama
    logits, handles = {}, []
    for name in ("plain", "sdp4bit"):
        config = llama3_debugmodel()
        if name == "sdp4bit":
            config = with_halfbyte(config, "sdp4bit", gpus_per_node=1, handles=handles)
        config.training.seq_len = 64
        config.parallelism.spmd_backend = "partial_dtensor"
        dims = _parallel_dims(config.parallelism)
        model_config = config.model_spec.model
        model_config.update_from_config(config=config)
        with torch.device("meta"):
            model = model_config.build()
        model = config.model_spec.parallelize_fn(
            model, parallel_dims=dims, training=config.training, parallelism=config.parallelism,
            compile_config=config.compile, ac_config=None, dump_folder="")
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
            tokens = torch.randint(2048, (2, 64), generator=torch.Generator().manual_seed(dist.get_rank()))
            positions = torch.arange(64).expand(2, -1)
            masks = model.get_attention_masks(positions=positions)
            logits[name] = model(tokens, positions, masks)
            model(tokens, positions, masks)
    assert torch.equal(logits["plain"], logits["sdp4bit"])
    (handle,) = handles
    by_op = handle.stats.by_op()
    assert by_op[OP_REPLICA_INIT]["calls"] == len(handle.module_names), by_op
    assert set(by_op) == {OP_REPLICA_INIT, OP_FROM_REPLICA}, by_op
    assert by_op[OP_FROM_REPLICA]["intra"] == by_op[OP_FROM_REPLICA]["inter"] == 0
    return {"modules": handle.module_names, "by_op": by_op, "comm": handle.comm.describe()}
