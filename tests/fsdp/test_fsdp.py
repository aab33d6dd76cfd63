"""halfbyte.fsdp on gloo CPU ranks: quantize_comms inside FSDP2 (and with TP). Bodies in
fsdp_workers.py; each test is one spawned job, its assertions run inside the ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from halfbyte.comm import spawn

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_workers as workers  # noqa: E402

# Held-out loss of each preset relative to plain FSDP2 on the same model, data and AdamW. Measured
# (torch 2.13 CPU): 2 ranks (2 nodes x 1), 30 steps: plain 1.0081; sdp4bit 1.0215 (+1.3%), zeropp
# 1.0179 (+1.0%), qwd 1.0080 (0.0%), qw4 1.2313 (+22%). 4 ranks (2 nodes x 2), 20 steps: plain
# 1.4558; sdp4bit 1.4685 (+0.9%), zeropp 1.4863 (+2.1%), qwd 1.4559 (0.0%). The 5% bound is 2.4x
# the worst measured gap yet 4x below what direct int4 weights cost; a broken codec (wrong scale,
# sign, layout, seed reuse across ranks) diverges far beyond it or breaks the replica check.
CLOSE = 1.05


@pytest.mark.timeout(240)
def test_presets_vs_plain_fsdp2_on_2_ranks():
    """baseline bit-identical to plain FSDP2 (losses, parameters, AdamW state); sdp4bit, zeropp,
    qwd close to it with bit-identical replicas after every step and exactly the predicted bytes
    per op; qw4 (direct int4 weights) clearly worse but learning."""
    r = spawn(workers.presets_vs_plain, 2, ["baseline", "sdp4bit", "zeropp", "qwd", "qw4"], 30, 1,
              timeout_s=220)[0]
    plain = r["plain"]["held_out"]
    assert plain < r["plain"]["first"] / 2, r["plain"]  # it does learn
    assert r["baseline"]["held_out"] == plain
    for preset in ("sdp4bit", "zeropp", "qwd"):
        assert r[preset]["held_out"] <= CLOSE * plain, (preset, r[preset]["held_out"], plain)
        assert r[preset]["summary"]["sent_MB"] < 0.45 * r["baseline"]["summary"]["sent_MB"], preset
    assert 1.10 * plain < r["qw4"]["held_out"] < r["plain"]["first"] / 2, (r["qw4"]["held_out"], plain)
    # qWD keeps one unsharded replica (fp32 here: no mixed precision); direct and full keep none
    assert r["qwd"]["replica_nbytes"] > 0 and r["zeropp"]["replica_nbytes"] == 0


@pytest.mark.timeout(240)
def test_four_ranks_two_nodes_and_dp_x_tp():
    """4 ranks as 2 nodes x 2: the presets as above (two-level gradients with an intra hop); dp 2 x
    tp 2 with sdp4bit next to plain FSDP2 + TP (baseline bit-identical, asserted in the ranks);
    the refusals that need 4 ranks."""
    r = spawn(workers.four_ranks, 4, ["baseline", "sdp4bit", "zeropp", "qwd"], 20, 30, timeout_s=220)[0]
    presets = r["presets"]
    plain = presets["plain"]["held_out"]
    assert presets["baseline"]["held_out"] == plain
    for preset in ("sdp4bit", "zeropp", "qwd"):
        assert presets[preset]["held_out"] <= CLOSE * plain, (preset, presets[preset]["held_out"], plain)
    assert presets["sdp4bit"]["summary"]["intra_MB"] > 0 and presets["sdp4bit"]["summary"]["inter_MB"] > 0
    # dp x tp: the dp groups {0, 2} and {1, 3} are 2 nodes x 1 rank; measured over the last 5 of
    # 30 steps: plain 0.1702, sdp4bit 0.1742 (+2.4%), from 0.847 at step 0
    tp_plain, tp = r["tp_plain"], r["tp_sdp4bit"]
    assert tp["topo"] == (2, 1, 2)
    assert tp_plain["last"] < tp_plain["first"] / 3
    assert tp["last"] <= 1.10 * tp_plain["last"], (tp["last"], tp_plain["last"])
    assert tp["summary"]["sent_MB"] < 0.25 * r["tp_baseline"]["summary"]["sent_MB"]
    # the replica of a column-parallel weight: replicated over dp, sharded over tp like the weight
    assert tp["replica_up"] == ("DTensor", (128, 32), (64, 32), "(Replicate(), Shard(dim=0))")


@pytest.mark.timeout(240)
def test_regathers_resume_ops_and_refusals_on_2_ranks():
    """Unchanged re-gathers send 0 bytes (backward, a forward without a step); a step or
    resend_weights makes the next forward send; bf16 mixed precision keeps a bf16 replica and
    trains; replica_state_dict resumes bit-identically; a corrupted replica is named; every
    reduce op FSDP passes is honoured; every unsupported case raises its ValueError."""
    r = spawn(workers.two_ranks_details, 2, 20, timeout_s=220)[0]
    q = r["qwd"]
    assert q["backward_gather_bytes"] == 0 and q["second_forward_bytes"] == 0, q
    assert q["from_replica"]["intra"] == q["from_replica"]["inter"] == 0
    # two backwards re-gather the 2 blocks (the root keeps its weights for backward), the forward
    # without a step all 3 groups
    assert q["from_replica"]["calls"] == 2 * 2 + 3 and q["from_replica"]["baseline"] > 0
    assert q["forward_bytes"] > 0 and q["resend_bytes"] == q["forward_bytes"]
    assert "all_gather" not in q["first"], q["first"]  # the first forward only fills the replicas
    # bf16 mixed precision, 20 steps: measured plain 1.5504, sdp4bit 1.5640 (+0.9%)
    assert q["mp"]["sdp4bit"] <= CLOSE * q["mp"]["plain"], q["mp"]
    assert r["refusals"]["untouched_calls"] == 0
