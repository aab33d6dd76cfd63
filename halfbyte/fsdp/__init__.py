"""halfbyte's 4-bit collectives inside PyTorch FSDP2 (`fully_shard`), composable with tensor
parallelism; the torchtitan hook is halfbyte.fsdp.torchtitan. See docs/fsdp.md."""

from halfbyte.comm.topology import topology_from_mesh
from halfbyte.fsdp.comms import OP_FROM_REPLICA, OP_REPLICA_INIT, HalfbyteAllGather, HalfbyteReduceScatter
from halfbyte.fsdp.quantize import QuantizedComms, quantize_comms
from halfbyte.fsdp.shard import find_blocks, shard_blocks, shard_model

__all__ = [
    "OP_FROM_REPLICA",
    "OP_REPLICA_INIT",
    "HalfbyteAllGather",
    "HalfbyteReduceScatter",
    "QuantizedComms",
    "find_blocks",
    "quantize_comms",
    "shard_blocks",
    "shard_model",
    "topology_from_mesh",
]
