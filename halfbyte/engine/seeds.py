"""Stochastic-rounding seeds, derived in one place so a virtual-rank emulation (one process playing
W ranks) reproduces exactly the noise the real multi-process engine draws.

The engine passes `collective_seed(...)` as the base seed of each collective call; the collective
then quantizes rank r's data in hop h with `halfbyte.comm.rank_seed(base, r, h)`. So the seed of
any quantization is a deterministic function of (engine seed, step, bucket, stream, rank, hop).
`step` is engine.step_count when the collective starts: for GRADS the optimizer steps completed
before that backward, for WEIGHTS the step just taken (1, 2, ...). Skipped steps do not count.
"""

from __future__ import annotations

from halfbyte.comm import mix_seed

# Which collective of a bucket a seed is for.
WEIGHTS = 0
GRADS = 1


def collective_seed(engine_seed: int, step: int, bucket: int, stream: int) -> int:
    """Base seed of one collective call, the same on every rank: distinct (with overwhelming
    probability) for every (engine seed, optimizer step, bucket, stream); < 2**62."""
    return mix_seed(engine_seed, step, bucket, stream)
