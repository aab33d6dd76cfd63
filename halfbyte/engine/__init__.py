"""Sharded data-parallel engine: flat buckets, overlapped (quantized) reduce-scatter, distributed
AdamW on owned shards, weight all-gather (full / direct / qWD), checkpoints."""

from halfbyte.engine.config import AdamWConfig, CommConfig
from halfbyte.engine.sharded import ShardedDataParallel, StepResult

__all__ = ["AdamWConfig", "CommConfig", "ShardedDataParallel", "StepResult"]
