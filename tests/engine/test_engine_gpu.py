"""The engine on one CUDA GPU: NCCL world of one, bf16 replica, Triton codec (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from halfbyte.comm import spawn

import engine_workers as workers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PRESETS = ["baseline", "qwd", "qw4", "sdp4bit", "zeropp", "tlq-hs"]


@pytest.mark.timeout(300)
def test_every_preset_memorizes_a_batch_with_bf16_replica_and_triton_codec():
    out = spawn(workers.gpu_presets_memorize, 1, PRESETS, 60, backend="nccl", timeout_s=280)[0]
    assert out["backend"].endswith("triton_kernels")
    base = out["baseline"]["losses"]
    assert base[-1] < 0.5 * base[0]  # one batch of 8 x 64 tokens is memorized quickly
    for preset in PRESETS:
        result = out[preset]
        assert result["dtypes"] == ["torch.bfloat16"] and result["buckets"] > 1, (preset, result)
        losses = result["losses"]
        assert losses[0] == pytest.approx(base[0], rel=1e-3), preset  # same init, same batch
        # Compressed modes follow the baseline's descent: within 25% of its final loss plus a floor
        # for the codec noise once the loss is small.
        assert losses[-1] < 1.25 * base[-1] + 0.1, (preset, losses[-1], base[-1])
