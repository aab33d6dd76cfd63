"""Orthonormal fast Walsh-Hadamard transform over consecutive blocks.

Rotating a block by H/sqrt(b) spreads an outlier's energy over the whole block, so the block's
absmax (and with it the quantization step) shrinks towards the block's RMS. H/sqrt(b) is symmetric
and orthogonal, hence its own inverse: the same function undoes it.
"""

from __future__ import annotations

import torch


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the orthonormal Walsh-Hadamard transform to each run of `block` consecutive values.

    Works on any shape whose numel is a multiple of `block` (a power of two); computes in fp32 and
    returns fp32 of the same shape. O(n log block) butterflies, no matrix is built.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    if x.numel() % block:
        raise ValueError(f"numel {x.numel()} is not a multiple of the Hadamard block {block}")
    y = x.reshape(-1, block).to(torch.float32)
    h = 1
    while h < block:
        y = y.view(-1, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y * block**-0.5).reshape(x.shape)
