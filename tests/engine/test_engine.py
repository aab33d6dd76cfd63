"""Multi-process engine tests on gloo (CPU, fp32 replicas). Bodies live in engine_workers.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from halfbyte.comm import spawn

# Spawned ranks import the worker bodies by module name; sys.path travels to them.
sys.path.insert(0, str(Path(__file__).parent))
import engine_workers as workers  # noqa: E402

COMPRESSED = ["zeropp", "sdp4bit", "qw4", "qwd", "tlq", "tlq-hs"]


@pytest.mark.timeout(240)
def test_baseline_matches_ddp_adamw_with_accumulation_clipping_unused_and_skip():
    """Baseline == torch DDP + AdamW + clip_grad_norm_ to 1e-5 (MLP and transformer, 12 steps,
    2 micro-batches, lr schedule); unused params don't hang; a non-finite grad on rank 1 skips
    the step on both ranks with weights unchanged. Assertions run inside the ranks."""
    reports = spawn(workers.baseline_vs_ddp, 2, timeout_s=200)
    assert all(math.isnan(r["skip"]) or math.isinf(r["skip"]) for r in reports)
    for r in reports:  # both ranks see the mismatch and name the bucket holding layer 2's weight
        assert "differs between ranks" in r["mismatch"] and "2.weight" in r["mismatch"], r
    mem = reports[0]["mlp"]["memory"]
    # fp32 replica + grads: 4 bytes per (padded) value each; master and the two Adam moments only
    # for the own half.
    assert mem["replica"] == mem["grads"] == 2 * mem["master"]
    assert mem["optimizer"] == 2 * mem["master"]
    assert mem["replica"] >= 4 * reports[0]["mlp"]["numel"]


@pytest.mark.timeout(240)
def test_every_preset_trains_close_to_baseline_on_2x2(tmp_path):
    """4 ranks as 2 emulated nodes x 2: every compressed preset reaches a loss near the baseline's,
    replicas stay bit-identical (check_replicas inside), and compressed modes send fewer bytes."""
    results = spawn(workers.presets_converge, 4, ["baseline", *COMPRESSED], 80, timeout_s=220)[0]
    base = results["baseline"]["loss"]
    assert base < results["baseline"]["first"] / 10, results["baseline"]  # it does learn
    for preset in COMPRESSED:
        r = results[preset]
        # Measured (80 steps): baseline 0.151; zeropp 0.145, sdp4bit 0.138, qwd 0.151, tlq 0.143,
        # tlq-hs 0.147; direct int4 weights (qw4) 0.239, as SDP4Bit reports qW to degrade.
        limit = 2.0 * base if preset == "qw4" else 1.15 * base
        assert r["loss"] <= limit, (preset, r["loss"], base)
        assert r["bytes"]["sent_MB"] < r["bytes"]["baseline_MB"], (preset, r["bytes"])
    for preset in ("sdp4bit", "tlq", "tlq-hs"):  # int4 inter-node gradients
        assert results[preset]["bytes"]["inter_MB"] < 0.6 * results["baseline"]["bytes"]["inter_MB"]


@pytest.mark.timeout(180)
def test_qwd_replica_tracks_master_while_direct_int4_drifts():
    """After 100 steps, qWD's |replica - master| is within one quantization level of the last
    step's delta (per group); direct int4 weights (qw4) are far off."""
    for r in spawn(workers.weight_error, 2, 100, timeout_s=150):
        assert r["qwd"]["within_one_step"], r
        assert r["qw4"]["mean"] > 20 * r["qwd"]["mean"], r  # measured ~130x


@pytest.mark.timeout(180)
def test_checkpoint_resume_is_bit_identical_and_refuses_mismatches(tmp_path):
    """Save/resume continues the same losses exactly (dropout included: RNG restored); a different
    model, comm config, world size or a partial checkpoint raise ValueError."""
    results = spawn(workers.checkpoint_resume, 2, str(tmp_path), timeout_s=150)
    for r in results:
        errors = r["errors"]
        assert set(errors) == {"model", "comm", "world", "partial"}, errors
        assert "different model" in errors["model"]
        assert "comm config" in errors["comm"] and "qwd" in errors["comm"]
        assert "4 ranks" in errors["world"]
        assert "incomplete" in errors["partial"]
    assert not (tmp_path / "ckpt.tmp").exists()
    assert (tmp_path / "ckpt" / "COMPLETE").exists()


@pytest.mark.timeout(120)
def test_frozen_params_broadcast_late_grads_raise_mismatched_ranks_fail_fast_deleted_engines_free():
    reports = spawn(workers.misuse_and_mismatch, 2, timeout_s=100)
    for r in reports:
        assert "arrived after its bucket was reduce-scattered" in r["late"], r
        assert "ranks disagree" in r["mismatch"], r
        assert r["freed"] == [True, True], "a deleted engine (or its model) is still alive"
