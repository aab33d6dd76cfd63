"""Sharded data-parallel engine: flat buckets, overlapped (quantized) reduce-scatter, distributed
AdamW on owned shards, weight all-gather (full / direct / qWD), checkpoints."""

from halfbyte.comm.config import CommConfig
from halfbyte.engine.config import AdamWConfig
from halfbyte.engine.sharded import ShardedDataParallel, StepResult

__all__ = ["AdamWConfig", "CommConfig", "ShardedDataParallel", "StepResult"]
