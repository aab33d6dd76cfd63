"""The sharded data-parallel engine, written once over a World (real or virtual ranks): flat
buckets, overlapped (quantized) reduce-scatter, distributed AdamW on owned shards, weight
all-gather (full / direct / qwd), checkpoints keyed by parameter name, local updates."""

from halfbyte.comm.config import CommConfig
from halfbyte.engine.checkpoint import CheckpointError
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.outer import LocalUpdates, OuterConfig, build_islands, virtual_islands
from halfbyte.engine.sharded import ShardedDataParallel, StepResult
from halfbyte.engine.world import ProcessGroupWorld, VirtualWorld, World

__all__ = [
    "AdamWConfig", "CheckpointError", "CommConfig", "LocalUpdates", "OuterConfig", "ProcessGroupWorld",
    "ShardedDataParallel", "StepResult", "VirtualWorld", "World", "build_islands", "virtual_islands",
]
