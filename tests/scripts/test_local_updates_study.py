"""scripts/local_updates_study.py: the grid (issue 20's, in priority order, on the convergence study's
design), every command as `halfbyte train` reads it, one shrunken command trained for real on CPU,
`run` with the fake trainer (runs of different lengths, a stop and a resume), and `report` on
synthetic metrics (paired gaps, the delay's cost, bytes per token)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# scripts/ is on sys.path (conftest.py), as when a script runs
import convergence_study as cs
import local_updates_study as lu
import study_common as sc

ROOT = sc.ROOT
SCRIPT = Path(lu.__file__)  # what the `study` fixture runs


# ------------------------------------------------------------------------------------------ design


def test_grid_is_issue_20s_in_priority_order_at_the_convergence_studys_tokens(tmp_path):
    runs = lu.grid()
    assert len(runs) == len({r.name for r in runs}) == 4 * (3 * 2 * 3 * 4 * 2 + 2 + 8)
    assert [r.name for r in runs[:5]] == ["baseline-w8-seed0", "m2-split-average-t32-d0-seed0",
                                          "m2-split-average-t32-d1-seed0", "m2-split-nesterov-t32-d0-seed0",
                                          "m2-split-nesterov-t32-d1-seed0"]
    tier2 = {r.arm.name for r in runs if r.arm.tier == 2}
    assert {"m2-split-average-t16-d0", "m4-split-average-t32-d0", "m2-full-average-t32-d0"} <= tier2
    tier3 = {r.arm.name for r in runs if r.arm.tier == 3}
    assert {"m2-split-sm-t32-d0", "m2-split-sm-t32-d0-lr4", "m2-split-average-t64-d0"} <= tier3
    tier4 = [r.arm.name for r in runs if r.arm.tier == 4 and r.seed == 0]  # the outer lr, before Nesterov at M>2
    assert tier4[:4] == ["m2-split-sm-t32-d0-lr8", "m2-split-sm-t32-d0-lr16", "m2-split-average-t32-d0-lr1.5",
                         "m2-split-average-t32-d0-lr2"]
    assert not any(name.startswith(("m4-", "m8-")) for name in tier4)
    assert "m4-split-nesterov-t32-d0" in {r.arm.name for r in runs if r.arm.tier == 5}
    tiers = [r.arm.tier for r in runs]
    assert tiers == sorted(tiers) and [r.seed for r in runs[:20]] == [s for s in range(4) for _ in range(5)]
    names = {a.name for a in lu.ARMS.values()}
    for M, batch, opt, tau, delay in itertools.product((2, 4, 8), ("split", "full"), ("sm", "nesterov", "average"),
                                                       (16, 32, 64, 128), (0, 1)):
        assert f"m{M}-{batch}-{opt}-t{tau}-d{delay}" in names
    tokens = cs.STEPS * cs.BATCH * cs.SEQ_LEN
    assert all(a.tokens == tokens for a in lu.ARMS.values())  # every comparison at the same tokens
    assert lu.ARMS["m8-full-sm-t128-d1"].steps == 128 and lu.ARMS["m8-full-sm-t128-d1"].twin == "m8-full-sm-t128-d0"
    for arm in ("baseline", "sdp4bit"):  # the convergence study's runs, command for command
        for seed in range(2):
            ours = lu.Run(lu.ARMS[f"{arm}-w8"], seed).argv(tmp_path / "d.bin", tmp_path, ["t"])
            assert ours == cs.Run(arm, 8, seed).argv(tmp_path / "d.bin", tmp_path, ["t"])


def test_halfbyte_train_reads_every_arms_command_as_designed(tmp_path, options):
    from halfbyte.train.cli import _islands, _layout
    from halfbyte.train.config import batch_layout, parse_args

    for arm in lu.ARMS.values():
        run = lu.Run(arm, 3)
        argv = run.argv(tmp_path / "d.bin", tmp_path, ["python3", "-m", "halfbyte", "train"])
        opts = options(argv)
        assert {k: opts[k] for k in arm.design()} == arm.design()
        cfg = parse_args(argv[argv.index("train") + 1:])
        m, t, o = cfg.model, cfg.train, cfg.outer
        assert (m.n_layer, m.d_model, m.n_head, m.ctx, m.dropout) == (cs.N_LAYER, cs.D_MODEL, cs.N_HEAD, cs.SEQ_LEN, 0)
        assert (t.steps, t.batch_size, t.seq_len) == (arm.steps, arm.batch_size, cs.SEQ_LEN)
        assert t.eval_tokens == cs.EVAL_TOKENS
        assert t.steps * t.batch_size == cs.STEPS * cs.BATCH and t.steps % t.eval_interval == 0
        assert (t.virtual_ranks, t.gpus_per_node) == (8, arm.gpus_per_node)
        assert (t.seed, t.resume, t.dtype) == (3, "auto", "bf16")
        assert (cfg.optim.lr, cfg.schedule.min_lr) == (1.5e-3, 1.5e-4)
        per_node, comm, _ = _layout(cfg, 8, False)
        assert _islands(cfg, 8, per_node, comm) == arm.islands  # the trainer accepts the layout
        micro, accum = batch_layout(cfg, 8)
        assert micro == 16 and micro * accum * 8 == arm.batch_size
        if not arm.islands:
            assert not o.enabled and t.preset == arm.preset
            continue
        assert t.preset == "baseline" and arm.gpus_per_node * arm.islands == 8  # one node per island
        assert (o.optimizer, o.local_steps, o.delay) == (lu.OPTIMIZERS[arm.optimizer], arm.tau, arm.delay)
        assert o.spec.bits == 4 and o.error_feedback and o.delay_mix is None and t.steps % o.local_steps == 0
        default_lr = {"sm": 1.0, "nesterov": 0.7, "average": 1.0}[arm.optimizer]
        assert o.lr == (default_lr if arm.outer_lr is None else arm.outer_lr)
        if arm.batch == "full":
            assert cfg.schedule.warmup_steps == 64 // arm.islands


def test_a_shrunken_study_command_trains_for_real(tmp_path):
    """m2-split-sm-t16-d1's command with the model, batch and steps shrunk: 2 islands of 4 virtual
    ranks, int4 sign momentum every 4 steps, the exchange applied a step later, on the CPU."""
    from halfbyte.train.data import TokenWriter, val_path_for

    tokens = tmp_path / "tiny.bin"
    rng = np.random.default_rng(1)
    for target, count in ((tokens, 20_000), (val_path_for(tokens), 2_000)):
        writer = TokenWriter(target, 4096)
        writer.write(rng.integers(0, 4096, count))
        writer.close()
    run = lu.Run(lu.ARMS["m2-split-sm-t16-d1"], 0)
    argv = run.argv(tokens, tmp_path, [sys.executable, "-m", "halfbyte", "train"])
    shrink = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.ctx", "32",
              "--train.seq_len", "32", "--steps", "8", "--batch-size", "16", "--train.micro_batch_size", "2",
              "--local-steps", "4", "--schedule.warmup_steps", "1", "--train.eval_tokens", "256",
              "--train.eval_interval", "4", "--train.checkpoint_interval", "4", "--train.dtype", "fp32",
              "--train.device", "cpu"]
    done = subprocess.run(argv + shrink, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / run.name
    last = sc.read_metrics(out)[-1]
    assert last["step"] == 8 and "val_loss" in last and last["wire_island_bytes"] > 0
    assert last["outer_steps"] in (1, 2)  # the round ending at step 8 is in flight unless the trainer flushes
    config = json.loads((out / "config.json").read_text())["outer"]
    assert (config["islands"], config["delay"], config["local_steps"], config["spec"]["bits"]) == (2, 1, 4, 4)


# ------------------------------------------------------------------------------------------- run


def test_the_launcher_estimates_a_run_by_its_own_work():
    """study_common.Launcher (the convergence study's) predicts a run from its steps x batch: a
    DiLoCo-style run of 1024/M steps of M x the batch takes as long as 1024 steps of one batch."""
    launcher = object.__new__(sc.Launcher)
    launcher.solo_seq_s = {8: 1e-3}  # s per sequence alone, at W=8
    split, full = (lu.Run(lu.ARMS[a], 0) for a in ("m2-split-sm-t32-d0", "m8-full-sm-t32-d0"))
    assert (split.steps, split.batch_size, full.steps, full.batch_size) == (1024, 128, 128, 1024)
    assert launcher.estimate(full, 2) == pytest.approx(launcher.estimate(split, 2))
    assert launcher.estimate(split, 2) == pytest.approx(2 * 1e-3 * 1024 * 128)
    provenance = full.provenance({"train_sha256": "a"})
    assert provenance["design"]["--steps"] == "128" and provenance["islands"] == 8 and "segments" not in provenance


def test_run_trains_runs_of_their_own_lengths_stops_and_resumes(tmp_path, data, study, dirs,
                                                                                          options, fake_train):
    runs = "m8-full-sm-t32-d0-seed0,m2-full-sm-t32-d0-seed0,baseline-w8-seed0"  # the short one first: kept
    common = [*dirs, "--data", str(data), "--poll-s", "0.05", "--stop-margin-s", "2",
              "--train-cmd", fake_train]
    env = {"FAKE_STEP_S": "0.002"}  # 1024 steps: >= 2 s, past the first call's stop at 1.8 s; 128 steps: 0.3 s
    first = study("run", *common, "--only", runs, "--parallel", "3", "--deadline-s", "3", "--stop-margin-s", "1.2",
                  env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    short = tmp_path / "m8-full-sm-t32-d0-seed0"  # 128 steps: done before the stop
    assert sc.status(short, 128) == "done" and sc.read_metrics(short)[-1]["val_loss"]
    segments = sc.read_provenance(tmp_path / "baseline-w8-seed0")["segments"]  # a shed run may resume once
    assert all(s["stopped"] in ("deadline", "shed") for s in segments) and 0 < segments[-1]["to_step"] < 1024
    assert [s["from_step"] for s in segments[1:]] == [s["to_step"] for s in segments[:-1]]
    delayed = "m8-full-sm-t32-d1-seed0"
    second = study("run", *common, "--only", f"{runs},{delayed}", "--deadline-s", "30", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    lengths = {"baseline-w8-seed0": 1024, "m2-full-sm-t32-d0-seed0": 512, "m8-full-sm-t32-d0-seed0": 128}
    for name, steps in lengths.items():
        d = tmp_path / name
        assert [r["step"] for r in sc.read_metrics(d)] == list(range(1, steps + 1)), name
        provenance = sc.read_provenance(d)
        assert provenance["design"] == lu.ARMS[name.removesuffix("-seed0")].design()
        assert provenance["segments"][-1]["to_step"] == steps and provenance["segments"][-1]["stopped"] is None
    calls = (tmp_path / "m2-full-sm-t32-d0-seed0" / "fake_calls.jsonl").read_text().splitlines()
    opts = options(["train", *json.loads(calls[-1])["argv"]])
    assert (opts["--steps"], opts["--batch-size"], opts["--islands"], opts["--outer.delay"]) == ("512", "256", "2", "0")
    assert sc.status(tmp_path / delayed, 128) == "done"


@pytest.mark.parametrize("script, results", [(lu, lu.RESULTS), (cs, cs.RESULTS)])
def test_runs_committed_under_benchmarks_results_count_as_done(tmp_path, data, script, results):
    """A fresh checkout has no runs/*-done (ignored by git), only the runs `report` committed: `plan`
    and `run` skip those too, instead of training them again on the GPU."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = subprocess.run([sys.executable, script.__file__, "plan", "--help"], capture_output=True, text=True,
                         env=env, check=True)
    assert sc.rel(results) in "".join(ran.stdout.split())  # the --done-in default names it (help wraps it)
    committed = sorted(p.parent.name for p in results.glob("baseline-w8-seed*/provenance.json"))
    assert committed, f"{sc.rel(results)} holds no committed baseline run"
    ran = subprocess.run([sys.executable, script.__file__, "plan", "--runs-dir", str(tmp_path), "--data", str(data),
                          "--only", committed[0]], capture_output=True, text=True, env=env, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert any(line.startswith(committed[0]) and line.endswith("done (earlier call)") for line in ran.stdout.splitlines())


# ------------------------------------------------------------------------------------------ report


BASE = {0: 2.00, 1: 2.10, 2: 1.90, 3: 2.00}
GAPS = {"m2-split-sm-t32-d0": [0.01, 0.012, 0.008, 0.011], "m2-split-sm-t32-d1": [0.012, 0.013, 0.009],
        "m2-full-sm-t32-d0": [0.03, 0.04], "sdp4bit-w8": [0.001, -0.001],
        "m2-split-nesterov-t32-d0": [0.14], "m2-split-nesterov-t32-d1": [0.16]}
ISLAND_BYTES = 1_000_000


def _synthetic_run(runs_dir: Path, arm: str, seed: int, final: float, **design) -> None:
    a = lu.ARMS[arm]
    run = lu.Run(a, seed)
    d = runs_dir / run.name
    d.mkdir(parents=True)
    curve = [{"step": s, "loss": final, "val_loss": final + 0.5 * (1 - s / a.steps), "wire_intra_bytes": 10 * s,
              "wire_inter_bytes": 3 * s * (0 if a.islands else 100), "elapsed_s": s / 10}
             for s in range(a.steps // 4, a.steps + 1, a.steps // 4)]
    if a.islands:
        curve[-1] |= {"wire_island_bytes": ISLAND_BYTES, "outer_steps": a.steps // a.tau}
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (d / "command.txt").write_text(f"python3 -m halfbyte train # {run.name}\n")
    segment = {"start_utc": "2026-12-01T10:00:00+00:00", "from_step": 0, "command": [], "commit": "c0ffee",
               "code_sha": "1234", "device": "NVIDIA H200", "exit_code": 0}
    provenance = {"run": run.name, "arm": a.preset if not a.islands else a.name, "world": 8, "seed": seed,
                  "design": a.design() | design, "data": {"train_sha256": "a" * 64, "val_sha256": "b" * 64},
                  "segments": [segment]}
    (d / "provenance.json").write_text(json.dumps(provenance))


def test_report_pairs_arms_with_the_baseline_and_delays_with_their_twins(tmp_path, study):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, loss in BASE.items():
        _synthetic_run(runs, "baseline-w8", seed, loss)
    for arm, gaps in GAPS.items():
        for seed, gap in enumerate(gaps):
            _synthetic_run(runs, arm, seed, BASE[seed] + gap)
    res = study("report", "--runs-dir", str(runs), str(tmp_path / "empty"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    sm = arms["m2-split-sm-t32-d0"]
    pct = [100 * g / BASE[s] for s, g in enumerate(GAPS["m2-split-sm-t32-d0"])]
    assert sm["vs_baseline"]["pct"]["mean"] == pytest.approx(sum(pct) / 4)
    assert sm["vs_baseline"]["verdict"]["target_pct"] == 1.0 and sm["vs_baseline"]["verdict"]["direction"] == "worse"
    tokens = cs.STEPS * cs.BATCH * cs.SEQ_LEN
    assert sm["island_bytes_per_token"] == pytest.approx(ISLAND_BYTES / tokens)
    # every-step bf16 DP between 2 islands of 4 ranks, by hand: each of the 8 ranks sends its bf16 weight
    # shard and its gradient chunk (ceil(N / 8) values) to the 4 ranks of the other island
    bf16 = 8 * 2 * (4 * math.ceil(cs.gpt_params() / 8) * 2) / (cs.BATCH * cs.SEQ_LEN)
    assert sm["dp_bf16_bytes_per_token"] == pytest.approx(bf16)
    assert sm["fewer_than_dp_bf16"] == pytest.approx(bf16 / (ISLAND_BYTES / tokens))
    assert sm["dp_sdp4bit_bytes_per_token"] < bf16 / 3
    delayed = arms["m2-split-sm-t32-d1"]["vs_no_delay"]
    assert delayed["n_seeds"] == 3 and delayed["verdict"]["target_pct"] == 0.3
    d = [GAPS["m2-split-sm-t32-d1"][s] - GAPS["m2-split-sm-t32-d0"][s] for s in range(3)]
    assert delayed["nats"]["mean"] == pytest.approx(sum(d) / 3)
    assert arms["m2-full-sm-t32-d0"]["steps"] == 512 and arms["m2-full-sm-t32-d0"]["vs_baseline"]["n_seeds"] == 2
    assert arms["sdp4bit-w8"]["vs_baseline"]["verdict"]["target_pct"] == cs.TARGET_PCT
    assert arms["baseline-w8"]["measured_bytes_per_token_2_islands"] == pytest.approx(300 * 1024 / tokens)
    assert "m4-split-sm-t32-d0-seed0" in summary["not_started"]
    for f in ("metrics.jsonl", "command.txt", "provenance.json"):
        assert (out / "m2-full-sm-t32-d0-seed1" / f).read_bytes() == (runs / "m2-full-sm-t32-d0-seed1" / f).read_bytes()
    assert (out / "local_updates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "| `m2-split-sm-t32-d1` | 3 |" in readme and "worse than baseline" in readme
    # one seed: its gap against the baseline's run of that seed, said to be one seed, no CI
    one = arms["m2-split-nesterov-t32-d0"]["vs_baseline"]
    assert one["n_seeds"] == 1 and one["single_seed"] == {"seed": 0, "nats": pytest.approx(0.14),
                                                          "pct": pytest.approx(7.0)}
    assert "pct" not in one  # no mean or CI to read as one
    delay_one = arms["m2-split-nesterov-t32-d1"]["vs_no_delay"]["single_seed"]
    assert delay_one["nats"] == pytest.approx(0.02) and delay_one["pct"] == pytest.approx(100 * 0.02 / 2.14)
    assert "| `m2-split-nesterov-t32-d0` | 1 | 2.1400 | +7.00% (seed 0 only, no CI) |" in readme

    _synthetic_run(tmp_path / "other", "m4-split-sm-t32-d0", 0, 2.0, **{"--lr": "3e-3"})
    refused = study("report", "--runs-dir", str(runs), str(tmp_path / "other"), "--out", str(out))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "m4-split-sm-t32-d0-seed0 was run with --lr 3e-3" in refused.stderr


def test_report_counts_reference_runs_of_every_seed_the_convergence_study_ran(tmp_path, study):
    # the convergence study runs its baseline / sdp4bit pairs past seed 16 (18 at 2026-12-03); a report
    # that knew only seeds 0-15 left seeds 16 and 17 out of sdp4bit-w8's gap without a word
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in range(18):
        _synthetic_run(runs, "baseline-w8", seed, 2.0 + 0.001 * seed)
        _synthetic_run(runs, "sdp4bit-w8", seed, 2.0 + 0.002 * seed)
    res = study("report", "--runs-dir", str(runs), "--out", str(out))
    assert res.returncode == 0, res.stderr
    gap = json.loads((out / "summary.json").read_text())["arms"]["sdp4bit-w8"]["vs_baseline"]
    assert gap["n_seeds"] == 18
    assert gap["nats"]["mean"] == pytest.approx(0.001 * sum(range(18)) / 18)
