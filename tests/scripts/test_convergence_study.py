"""scripts/convergence_study.py: the grid's pairing, `plan`, `run` (with a fake trainer that obeys
SIGTERM and --resume auto: stop at the deadline, resume in the next call, refuse a changed design),
`prepare`'s cache, and `report` on synthetic metrics (paired statistics, files, refusals)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# scripts/ is on sys.path (conftest.py), as when a script runs
import convergence_study as cs
import study_common as sc

SCRIPT = Path(cs.__file__)  # what the `study` fixture runs


# ------------------------------------------------------------------------------------------ design


def test_grid_pairs_arms_by_seed_and_matches_the_design(tmp_path, options):
    runs = cs.grid()
    assert len(runs) == len({r.name for r in runs}) == 4 * 4 + 2 * 4 + 2 * 4
    assert [r.name for r in runs[:4]] == ["baseline-w8-seed0", "sdp4bit-w8-seed0", "qw4-w8-seed0", "zeropp-w8-seed0"]
    argvs = {r: options(r.argv(tmp_path / "d.bin", tmp_path, ["python3", "-m", "halfbyte", "train"]))
             for r in runs}
    per_run = {"--preset", "--train.name", "--out", "--seed", "--virtual-ranks", "--virtual-gpus-per-node",
               "--train.micro_batch_size"}
    shared = {k: v for k, v in argvs[runs[0]].items() if k not in per_run}
    for run, opts in argvs.items():
        # pairing: apart from arm, seed and layout, every run has the same command
        assert {k: v for k, v in opts.items() if k not in per_run} == shared
        assert opts["--preset"] == run.arm and opts["--seed"] == str(run.seed) and opts["--resume"] == "auto"
        layout = (opts["--virtual-ranks"], opts["--virtual-gpus-per-node"])
        assert layout == (str(run.world), {8: "4", 32: "8"}[run.world])
        assert int(opts["--train.micro_batch_size"]) * run.world == cs.BATCH
        assert opts["--out"].endswith(run.name)
    assert {r.arm for r in runs if r.world == 32} == {"baseline", "sdp4bit"}
    assert all(sum(1 for r in runs if (r.arm, r.world) == (a, w)) == 4 for a, w in {(r.arm, r.world) for r in runs})
    assert int(shared["--train.eval_tokens"]) >= 2_000_000
    assert int(shared["--steps"]) % int(shared["--train.eval_interval"]) == 0  # evaluations fall on the last step
    assert sc.CHECKPOINT_MARKER == __import__("halfbyte.engine.checkpoint", fromlist=["MARKER"]).MARKER


def test_halfbyte_train_reads_every_command_as_designed(tmp_path):
    from halfbyte.train.config import batch_layout, parse_args

    for run in cs.grid():
        cfg = parse_args(run.argv(tmp_path / "d.bin", tmp_path, []))
        m, t = cfg.model, cfg.train
        assert (m.n_layer, m.d_model, m.n_head, m.ctx, m.dropout) == (cs.N_LAYER, cs.D_MODEL, cs.N_HEAD, cs.SEQ_LEN, 0)
        assert (t.steps, t.batch_size, t.seq_len, t.eval_tokens) == (cs.STEPS, cs.BATCH, cs.SEQ_LEN, cs.EVAL_TOKENS)
        assert (t.virtual_ranks, t.gpus_per_node, t.preset, t.seed) == (run.world, run.gpus_per_node, run.arm, run.seed)
        assert t.resume == "auto" and t.out_dir.endswith(run.name) and t.dtype == "bf16"
        assert t.weight_decay_on == "all"  # what the study's runs trained with before the option existed
        assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.engine.grad_clip) == (1.5e-3, 1.5e-4, 1.0)
        assert batch_layout(cfg, run.world) == (cs.BATCH // run.world, 1)  # no accumulation


def test_parameter_count_is_the_models():
    from halfbyte.train.model import build_model

    model = build_model("tiny", cs.VOCAB, n_layer=cs.N_LAYER, d_model=cs.D_MODEL, n_head=cs.N_HEAD, ctx=cs.SEQ_LEN)
    assert cs.gpt_params() == model.num_params()
    assert cs.gpt_params(2, 64, 128) == build_model("tiny", 128, n_layer=2, d_model=64, n_head=4).num_params()


def test_fits_gates_runs_that_would_end_after_the_stop():
    assert sc.fits(None, 1.0, 500.0, 100.0)  # no estimate yet: the first wave starts
    assert sc.fits(100.0, 1.0, 0.0, 110.5) and not sc.fits(100.0, 1.0, 0.0, 109.5)  # 1.1 x 100 s
    assert sc.fits(100.0, 0.25, 80.0, 108.0)  # a resumed run needs only its remaining quarter


def test_shed_runs_resume_in_priority_order_ahead_of_the_rest_and_only_picks_each_run_once():
    grid = cs.grid()
    a, b, c, d = grid[:4]
    priority = {r.name: i for i, r in enumerate(grid)}
    assert sc.requeue([c, b], [d], priority) == [b, c, d]  # c ended first; b had started first
    assert sc.requeue([], [d], priority) == [d]
    assert sc.pick(grid, f"{b.name},{a.name}") == [b, a]
    with pytest.raises(sc.StudyError, match=f"names {a.name} more than once"):
        sc.pick(grid, f"{a.name},{b.name},{a.name}")


def test_keep_count_sheds_the_last_runs_only_when_that_lets_the_others_end():
    # 4 runs sharing the GPU, each 100 s from its end; 60 s left: keeping 2 makes them 50 s (x 1.1 = 55 s)
    assert sc.keep_count([100.0] * 4, 60.0) == 2
    assert sc.keep_count([100.0] * 4, 111.0) == 4
    assert sc.keep_count([100.0, 100.0, 300.0], 80.0) == 2  # the first two then need 1.1 x 66.7 s
    assert sc.keep_count([100.0] * 4, 20.0) == 4  # not even one alone (27.5 s) ends: keep all for a resume


def test_code_version_compares_contents_with_the_commit(tmp_path):
    """The GPU machine's copy once recorded the session's first commit as clean while it ran a later
    tree (a kernel merged since): git's status trusts its index, so code_version compares contents."""

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "halfbyte").mkdir()
    (tmp_path / "halfbyte" / "k.py").write_text("RUN = 0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = sc.code_version(tmp_path)
    assert clean["commit"] and clean["halfbyte_dirty"] is False
    git("update-index", "--assume-unchanged", "halfbyte/k.py")  # status no longer looks at the file
    (tmp_path / "halfbyte" / "k.py").write_text("RUN = 32\n")
    changed = sc.code_version(tmp_path)
    assert changed["halfbyte_dirty"] is True and changed["code_sha"] != clean["code_sha"]
    (tmp_path / "halfbyte" / "new.py").write_text("\n")  # untracked code ran too
    (tmp_path / "halfbyte" / "k.py").write_text("RUN = 0\n")
    assert sc.code_version(tmp_path)["halfbyte_dirty"] is True
    assert sc.code_version(tmp_path / "nowhere")["commit"] is None  # no repository: no commit, no claim


def test_shed_line_shows_the_safety_margin_that_decided():
    # the GPU call of 2026-12-02 (fifth session) shed a run on "2 runs would end 183 s from now, after
    # the stop at 217 s" at 29 s: 29 + 183 < 217, so the line hid the 1.1 margin the rule applies
    line = sc.shed_line(29.0, [183.0, 170.0], 217.0, ["sdp4bit-w8-seed7"])
    assert "201 s with the 1.1 margin" in line and "188 s left before the stop at 217 s" in line
    assert line.endswith("shed sdp4bit-w8-seed7")


# ------------------------------------------------------------------------------------- plan / run


def test_plan_lists_the_grid_with_status_and_commands(tmp_path, data, study, dirs):
    (tmp_path / "qw4-w8-seed1").mkdir()
    (tmp_path / "qw4-w8-seed1" / "metrics.jsonl").write_text('{"step": 16, "loss": 3.0}\n')
    _synthetic_run(tmp_path / "done", "zeropp", 8, 3, 2.5)  # finished in an earlier call
    res = study("plan", *dirs, "--data", str(data))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    table = [line.split()[0] for line in lines if line.split() and line.split()[0] in {r.name for r in cs.grid()}]
    assert table == [r.name for r in cs.grid()]
    assert "qw4-w8-seed1" in next(line for line in lines if "partial (step 16, resumes from 0)" in line)
    assert "zeropp-w8-seed3" in next(line for line in lines if "done (earlier call)" in line)
    commands = [line for line in lines if " -m halfbyte train " in line]
    assert len(commands) == len(cs.grid()) and all("--resume auto" in c for c in commands)
    assert "20.98M parameters" in lines[0] and "67.1M tokens" in lines[0]


def test_run_stops_at_the_deadline_resumes_and_records_provenance(tmp_path, data, study, dirs, fake_train):
    runs = "baseline-w8-seed0,sdp4bit-w8-seed0,qw4-w8-seed0"
    common = [*dirs, "--data", str(data), "--only", runs, "--poll-s", "0.05",
              "--stop-margin-s", "2", "--train-cmd", fake_train]
    env = {"FAKE_STEP_S": "0.004"}  # 1024 steps: >= 4 s per run
    first = study("run", *common, "--parallel", "2", "--deadline-s", "3", "--stop-margin-s", "1.5", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    stopped = {}
    for name in ("baseline-w8-seed0", "sdp4bit-w8-seed0"):
        d = tmp_path / name
        steps = [r["step"] for r in sc.read_metrics(d)]
        assert 0 < steps[-1] < cs.STEPS and steps == list(range(1, steps[-1] + 1))
        assert sc.newest_checkpoint_step(d) == steps[-1]  # SIGTERM saved a checkpoint at the stop
        (segment,) = sc.read_provenance(d)["segments"]
        assert segment["stopped"] == "deadline" and segment["exit_code"] == 0 and segment["from_step"] == 0
        assert segment["to_step"] == steps[-1] and segment["code_sha"] and segment["start_utc"]
        assert "--resume auto" in (d / "command.txt").read_text()
        stopped[name] = steps[-1]
    assert not (tmp_path / "qw4-w8-seed0").exists()  # its slot never freed before the stop
    assert "not started" in first.stdout

    second = study("run", *common, "--parallel", "3", "--deadline-s", "40", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    for name in runs.split(","):
        d = tmp_path / name
        records = sc.read_metrics(d)
        assert [r["step"] for r in records] == list(range(1, cs.STEPS + 1))  # continuous, no duplicates
        assert sc.status(d, cs.STEPS) == "done" and sc.final_val_loss(records, cs.STEPS) == records[-1]["val_loss"]
        calls = [json.loads(line)["resumed_from"] for line in (d / "fake_calls.jsonl").read_text().splitlines()]
        segments = sc.read_provenance(d)["segments"]
        if name in stopped:
            assert calls == [0, stopped[name]]
            assert [s["from_step"] for s in segments] == [0, stopped[name]]
        else:
            assert calls == [0] and len(segments) == 1
        assert segments[-1]["to_step"] == cs.STEPS and segments[-1]["stopped"] is None
        provenance = sc.read_provenance(d)
        assert provenance["design"] == cs.DESIGN and provenance["data"]["val_tokens"] == cs.EVAL_TOKENS + 1
        assert provenance["data"]["train_sha256"] == sc._sha256(data)

    third = study("run", *common, "--deadline-s", "40", env=env)
    assert third.returncode == 0 and "nothing to run" in third.stdout

    # a run finished in an earlier call (its directory carried into --done-in) is not run again ...
    done = tmp_path / "done"
    done.mkdir()
    (done / "zeropp-w8-seed0").mkdir()
    for f in ("metrics.jsonl", "provenance.json", "command.txt"):
        (done / "zeropp-w8-seed0" / f).write_bytes((tmp_path / "qw4-w8-seed0" / f).read_bytes())
    only_zeropp = [("zeropp-w8-seed0" if x == runs else x) for x in common]
    skipped = study("run", *only_zeropp, "--deadline-s", "40", env=env)
    assert skipped.returncode == 0 and "nothing to run" in skipped.stdout
    assert not (tmp_path / "zeropp-w8-seed0").exists()
    # ... unless it was trained on other data: then nothing runs beside it
    carried = json.loads((done / "zeropp-w8-seed0" / "provenance.json").read_text())
    carried["data"]["val_sha256"] = "0" * 64
    (done / "zeropp-w8-seed0" / "provenance.json").write_text(json.dumps(carried))
    other = study("run", *only_zeropp, "--deadline-s", "40", env=env)
    assert other.returncode == 2 and "was trained on other data (val_sha256 000000000000" in other.stderr
    assert len(sc.read_provenance(tmp_path / "qw4-w8-seed0")["segments"]) == 1

    # a run recorded with another design cannot be continued (nor silently paired)
    path = tmp_path / "qw4-w8-seed0" / "provenance.json"
    changed = json.loads(path.read_text())
    changed["design"]["--steps"] = "512"
    path.write_text(json.dumps(changed))
    refused = study("run", *common, "--deadline-s", "40", env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "qw4-w8-seed0 was started with --steps 512" in refused.stderr and "Traceback" not in refused.stderr


def test_run_sheds_runs_that_would_make_all_miss_the_stop(tmp_path, data, study, dirs, fake_train):
    # fakes that share a "GPU": a step takes 2 ms x the number of live fakes, 1024 steps. Three side
    # by side need ~6 s, past the stop at 5.9 s; two need ~4 s: the third is shed, the first two end.
    shared = tmp_path / "gpu"
    shared.mkdir()
    runs = "baseline-w8-seed0,sdp4bit-w8-seed0,qw4-w8-seed0"
    res = study("run", *dirs, "--data", str(data), "--only", runs, "--parallel", "3",
                "--poll-s", "0.05", "--deadline-s", "8.5", "--stop-margin-s", "2.6",
                "--train-cmd", fake_train, env={"FAKE_STEP_S": "0.002", "FAKE_SHARED": str(shared)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shed qw4-w8-seed0" in res.stdout
    assert [sc.status(tmp_path / n, cs.STEPS) for n in runs.split(",")[:2]] == ["done", "done"]
    segments = sc.read_provenance(tmp_path / "qw4-w8-seed0")["segments"]
    assert segments[0]["stopped"] == "shed" and 0 < segments[0]["to_step"] < cs.STEPS
    assert sc.newest_checkpoint_step(tmp_path / "qw4-w8-seed0") >= segments[0]["to_step"]  # resumable
    # once the kept runs ended it may resume in this call, from where it was shed (here ~1.5 s of
    # its work alone against ~1.8 s left: timing decides, the order may not)
    assert len(segments) <= 2 and all(s["from_step"] == segments[0]["to_step"] for s in segments[1:])


@pytest.mark.parametrize("warm_next", [False, True])
def test_warm_next_starts_a_run_that_cannot_end_before_the_stop_and_sheds_none(tmp_path, data, study, dirs,
                                                                              fake_train, warm_next):
    # two fakes share a "GPU" (a step: 2 ms x the live fakes, 1024 steps): ~4-5 s to end together. The
    # third alone needs ~2.2 s x the 1.1 margin, past the stop at 6 s. Gated it does not start; with
    # --warm-next it runs to the stop and its SIGTERM checkpoint resumes in the next call.
    shared = tmp_path / "gpu"
    shared.mkdir()
    runs = "baseline-w8-seed0,sdp4bit-w8-seed0,qw4-w8-seed0"
    res = study("run", *dirs, "--data", str(data), "--only", runs, "--parallel", "2", "--poll-s", "0.05",
                "--deadline-s", "9", "--stop-margin-s", "3", "--train-cmd", fake_train,
                *(["--warm-next"] if warm_next else []), env={"FAKE_STEP_S": "0.002", "FAKE_SHARED": str(shared)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shed" not in res.stdout
    assert [sc.status(tmp_path / n, cs.STEPS) for n in runs.split(",")[:2]] == ["done", "done"]
    third = tmp_path / "qw4-w8-seed0"
    if not warm_next:
        assert not third.exists() and "not started" in res.stdout
        return
    (segment,) = sc.read_provenance(third)["segments"]
    assert segment["stopped"] == "deadline" and 0 < segment["to_step"] < cs.STEPS
    assert sc.newest_checkpoint_step(third) == segment["to_step"]


def test_a_finished_segment_predicts_a_run_alone_and_shared_by_its_own_work():
    # 512 of 1024 steps of 128 sequences in 100 s while two runs shared the GPU throughout: 100 s
    # for a full run alone
    per_sequence = sc.solo_s(100.0, 200.0, 512 * cs.BATCH)
    assert per_sequence * cs.STEPS * cs.BATCH == pytest.approx(100.0)
    assert sc.solo_s(50.0, 20.0, 1024) == pytest.approx(50.0 / 1024)  # alone (sharing below 1 reads as 1)
    launcher = object.__new__(sc.Launcher)
    launcher.solo_seq_s = {8: per_sequence}
    w8, w32 = (next(r for r in cs.grid() if r.world == w) for w in (8, 32))
    assert launcher.estimate(w8, 3) == pytest.approx(300.0) and launcher.estimate(w32, 1) is None
    # a run's estimate is its own work: a quarter of the steps, a quarter of the time
    short = SimpleNamespace(world=8, steps=256, batch_size=cs.BATCH)
    assert launcher.estimate(short, 1) == pytest.approx(25.0)


class _Proc:
    """A child process that records the signals sent to it."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def _launcher(tmp_path: Path, stop_s: float = 1e9) -> sc.Launcher:
    launcher = object.__new__(sc.Launcher)
    launcher.runs_dir, launcher.stop_s, launcher.kept = tmp_path, stop_s, set()
    return launcher


def _child(tmp_path: Path, name: str, from_step: int = 0, **fields) -> sc.Child:
    (tmp_path / name).mkdir()
    return sc.Child(SimpleNamespace(name=name, steps=cs.STEPS), _Proc(), 0.0, from_step, None, 0, step=from_step,
                    eval_every=128, save_every=256, **fields)


def _poll(launcher: sc.Launcher, children: list, step: int, written_s: float, now_s: float) -> None:
    """Each child writes its row of `step` at `written_s` (the launcher's clock: the file's mtime), then
    the launcher polls at now_s."""
    for child in children:
        path = launcher.runs_dir / child.run.name / "metrics.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "loss": 3.0, **({"val_loss": 3.0} if step % 128 == 0 else {})}) + "\n")
        mtime = time.time() - (now_s - written_s)
        os.utime(path, (mtime, mtime))
    launcher.shed_late(children, now_s)


def _written(step: int, per16_s: float = 5.3, eval_s: float = 5.0, save_s: float = 2.0) -> float:
    """When the trainer writes its row of `step` (from step 0 at 0 s): 16 steps of training take
    per16_s, an evaluation every 128 steps (before its row) eval_s, a save every 256 (after its row) save_s."""
    return step / 16 * per16_s + eval_s * (step // 128) + save_s * ((step - 1) // 256)


def test_events_between_rows_and_ahead_count_evaluations_before_their_row_and_saves_after():
    assert sc.events(1024, 128, 256, 112, 128) == {"eval": 1, "save": 0}  # the row of 128 comes after its eval
    assert sc.events(1024, 128, 256, 128, 144) == {"eval": 0, "save": 0}
    assert sc.events(1024, 128, 256, 240, 256) == {"eval": 1, "save": 0}
    assert sc.events(1024, 128, 256, 256, 272) == {"eval": 0, "save": 1}  # ... and a save after it
    assert sc.events(1024, 128, 256, 416, 1024) == {"eval": 5, "save": 2}  # ahead: 512 ... 1024; 512, 768
    assert sc.events(1024, 128, 256, 256, 1024) == {"eval": 6, "save": 3}  # the save of 256 is still ahead
    assert sc.events(1000, 128, 256, 0, 1000) == {"eval": 8, "save": 3}  # 128 ... 896, and the last step
    assert sc.events(1000, 0, 0, 0, 1000) == {"eval": 1, "save": 0}  # 0: only at the end (no save counted there)


def test_a_rate_window_holding_an_evaluation_predicts_the_hand_computed_remaining_time(tmp_path):
    # the GPU call of 2026-12-03: 16 steps take 5.3 s with 8 runs sharing, an evaluation ~5 s (every 128
    # steps), a save (every 256) here 2 s. A 48-step window (rows 368 -> 416) holds the evaluation of
    # 384: the rate measured over the whole window (20.9 s / 48 steps) predicted 608 x 20.9 / 48 =
    # 264.7 s, the evaluation charged to 48 steps instead of 128 (+ 5 s x (608 / 48 - 5) = 38 s).
    launcher, child = _launcher(tmp_path), _child(tmp_path, "a")
    for step in range(16, 353, 16):  # a first window measures an evaluation (gap 112 -> 128) and a save (256 -> 272)
        _poll(launcher, [child], step, _written(step), _written(step) + 0.4)
    child.window = None  # the sharing changed
    for step in range(368, 417, 16):
        _poll(launcher, [child], step, _written(step), _written(step) + 0.4)
    assert child.costs == pytest.approx({"eval": 5.0 / (5.3 / 16), "save": 2.0 / (5.3 / 16)}, abs=0.01)  # steps
    (remaining,) = launcher.predict([child], _written(416) + 0.4)
    # by hand: 608 steps x 5.3 / 16 s + 5 evaluations x 5 s + 2 saves x 2 s, less the 0.4 s since the row
    assert remaining == pytest.approx(608 * 5.3 / 16 + 5 * 5.0 + 2 * 2.0 - 0.4, abs=0.01)  # 230.0 s
    assert remaining < 608 * 20.9 / 48 - 30  # the old prediction, 264.7 s


def test_no_run_is_shed_before_an_evaluation_is_measured_then_the_hand_computed_shed(tmp_path, capsys):
    # two runs share the GPU: 16 steps in 10.6 s, an evaluation 10 s; the stop 705.8 s from the start.
    # Up to row 112 no evaluation was measured: no prediction (the rate alone, 63.6 s / 96 steps,
    # would say 604 s + evaluations unknown). At row 128 (94.8 s, polled at 95.2 s): 0.6625 s a step x
    # (896 steps + 10 events x 15.09 steps, the saves taken to cost an evaluation until one is measured)
    # - 0.4 s = 693.2 s each; x 1.1 = 762.5 s > 610.6 s left; one alone: 381.3 s: B is shed.
    launcher = _launcher(tmp_path, stop_s=705.8)
    a, b = _child(tmp_path, "a"), _child(tmp_path, "b")
    timing = dict(per16_s=10.6, eval_s=10.0)
    for step in range(16, 113, 16):
        _poll(launcher, [a, b], step, _written(step, **timing), _written(step, **timing) + 0.4)
    assert launcher.predict([a, b], _written(112, **timing) + 0.4) is None and not b.shed
    _poll(launcher, [a, b], 128, _written(128, **timing), 95.2)
    assert b.shed and b.proc.signals == [sc.signal.SIGTERM] and not a.shed and launcher.kept == {"a"}
    line = capsys.readouterr().out
    assert "2 runs would end 693 s from now, 763 s with the 1.1 margin, against 611 s left" in line, line
    assert a.window is None  # the kept run is faster now: measured again


def test_a_run_without_measured_costs_borrows_the_largest_of_the_others(tmp_path):
    # resumed at 384; rows 400 -> 448 (8 s per 16 steps) hold no evaluation nor save
    launcher = _launcher(tmp_path)
    a = _child(tmp_path, "a", 384, costs={"eval": 20.0})
    b, alone = _child(tmp_path, "b", 384), _child(tmp_path, "alone", 384)
    for i, step in enumerate(range(400, 449, 16)):
        _poll(launcher, [a, b, alone], step, 8.0 * i, 8.0 * i + 0.4)
    assert launcher.predict([alone], 24.4) is None  # nothing measured: wait for an evaluation
    now = 24.4
    # 0.5 s a step x (576 steps + 5 evaluations x 20 + 2 saves x 20: a save costs an evaluation until
    # one is measured) - 0.4 s
    assert launcher.predict([a, b], now) == pytest.approx([0.5 * 716 - 0.4] * 2, abs=0.01)
    a.costs["save"] = 6.0
    b.costs["eval"] = 10.0  # its own, not the larger of a's
    assert launcher.predict([a, b], now) == pytest.approx([0.5 * (576 + 100 + 12) - 0.4,
                                                          0.5 * (576 + 50 + 12) - 0.4], abs=0.01)


def test_run_reports_a_failed_run_and_refuses_bad_input(tmp_path, data, study, dirs, fake_train):
    common = [*dirs, "--data", str(data), "--poll-s", "0.05", "--stop-margin-s", "2",
              "--train-cmd", fake_train]
    res = study("run", *common, "--only", "zeropp-w8-seed2", "--deadline-s", "30", env={"FAKE_FAIL_PRESET": "zeropp"})
    assert res.returncode == 1 and "failed: zeropp-w8-seed2" in res.stdout and "simulated failure" in res.stdout
    assert sc.read_provenance(tmp_path / "zeropp-w8-seed2")["segments"][0]["exit_code"] == 1
    for args, message in ((["--only", "nope-w8-seed0", "--deadline-s", "9"], "--only: unknown run(s) nope-w8-seed0"),
                          (["--deadline-s", "10", "--stop-margin-s", "20"], "--deadline-s > --stop-margin-s")):
        bad = study("run", *common, *args)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.count("\n") == 1
    missing = study("run", *dirs, "--data", str(tmp_path / "none.bin"), "--deadline-s", "90")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and missing.stderr.count("\n") == 1


def test_metrics_being_written_are_read_without_their_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert sc.last_step(tmp_path) == 2 and sc.status(tmp_path, cs.STEPS).startswith("partial (step 2,")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(sc.StudyError, match="line 2 is not JSON"):
        sc.read_metrics(tmp_path)


def test_prepare_tokenizes_once_then_uses_the_cache(tmp_path, study):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{k}(x):\n    return x * {k}\n" for k in range(200)))
    out = tmp_path / "corpus.bin"
    first = study("prepare", "--data", str(out), "--inputs", str(src))
    assert first.returncode == 0, first.stderr
    made = json.loads(out.with_name("corpus.bin.json").read_text())
    assert (made["tokenizer"], made["val_fraction"], made["files"]) == ("builtin", cs.VAL_FRACTION, 3)
    assert made["val_tokens"] > 0 and out.with_name("corpus.val.bin").is_file()
    again = study("prepare", "--data", str(out), "--inputs", str(src))
    assert again.returncode == 0 and "cached" in again.stdout


# ------------------------------------------------------------------------------------------ report


BASE8 = {0: 2.00, 1: 2.10, 2: 1.90, 3: 2.00}
GAPS = {("sdp4bit", 8): [0.001, -0.002, 0.002, 0.0], ("qw4", 8): [0.05, 0.06, 0.055, 0.052],
        ("baseline", 32): [0.01, 0.02], ("sdp4bit", 32): [0.012, 0.021], ("zeropp", 8): [0.003]}


def _synthetic_run(runs_dir: Path, arm: str, world: int, seed: int, final: float | None, **override) -> None:
    run = cs.Run(arm, world, seed)
    d = runs_dir / run.name
    d.mkdir(parents=True)
    last = cs.STEPS if final is not None else 512
    curve = [{"step": s, "loss": final or 3.0, "val_loss": (final or 3.0) + 0.5 * (1 - s / last)}
             for s in range(128, last + 1, 128)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (d / "command.txt").write_text(f"python3 -m halfbyte train --preset {arm}\n")
    data = {"train_sha256": "a" * 64, "val_sha256": "b" * 64, "train_tokens": 1, "val_tokens": 1}
    segment = {"start_utc": "2026-11-30T10:00:00+00:00", "from_step": 0, "command": [], "commit": "c0ffee",
               "code_sha": "1234", "device": "NVIDIA H200", "exit_code": 0}
    provenance = {"run": run.name, "arm": arm, "world": world, "seed": seed, "design": dict(cs.DESIGN),
                  "data": data, "segments": [segment]}
    for key, value in override.items():
        target = provenance if key in provenance else segment
        target[key] = value
    (d / "provenance.json").write_text(json.dumps(provenance))


def _synthetic_study(runs_dir: Path) -> None:
    for seed, loss in BASE8.items():
        _synthetic_run(runs_dir, "baseline", 8, seed, loss)
    for (arm, world), gaps in GAPS.items():
        for seed, gap in enumerate(gaps):
            base = BASE8[seed] + (GAPS[("baseline", 32)][seed] if world == 32 and arm != "baseline" else 0.0)
            _synthetic_run(runs_dir, arm, world, seed, base + gap)
    _synthetic_run(runs_dir, "sdp4bit", 32, 2, None)  # cut short: listed, not paired


def test_report_pairs_by_seed_and_writes_results(tmp_path, study):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _synthetic_study(runs)
    res = study("report", "--runs-dir", str(runs), "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    w8 = summary["comparisons"]["w8"]
    qw4 = w8["arms"]["qw4"]
    # by hand: gaps 0.05, 0.06, 0.055, 0.052 -> mean 0.05425; squared deviations sum 5.675e-5
    sd = math.sqrt(5.675e-5 / 3)
    assert qw4["n_seeds"] == 4 and qw4["nats"]["mean"] == pytest.approx(0.05425)
    assert qw4["nats"]["sd"] == pytest.approx(sd)
    assert qw4["nats"]["half_width"] == pytest.approx(3.182446 * sd / 2, rel=1e-6)
    assert qw4["pct"]["mean"] == pytest.approx(sum(100 * g / BASE8[s] for s, g in enumerate(GAPS[("qw4", 8)])) / 4)
    assert qw4["verdict"]["direction"] == "worse" and qw4["verdict"]["excludes_zero"]
    sdp = w8["arms"]["sdp4bit"]
    assert sdp["nats"]["mean"] == pytest.approx(0.00025) and sdp["verdict"]["direction"] == "no difference detected"
    zeropp = w8["arms"]["zeropp"]  # one seed: no spread, no interval
    assert zeropp["n_seeds"] == 1 and "pct" not in zeropp and "at least 2 seeds" in zeropp["note"]
    w32 = summary["comparisons"]["w32"]["arms"]["sdp4bit"]
    assert w32["seeds"] == [0, 1] and w32["differences_nats"] == pytest.approx([0.012, 0.021])
    assert summary["unfinished"] == ["sdp4bit-w32-seed2"] and "tlq-hs-w8-seed0" in summary["not_started"]
    for name in ("qw4-w8-seed3", "baseline-w32-seed1"):
        for f in ("metrics.jsonl", "command.txt", "provenance.json"):
            assert (out / name / f).read_bytes() == (runs / name / f).read_bytes()
    assert not (out / "sdp4bit-w32-seed2").exists()
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| qw4 | 8 | 4 |" in res.stdout and "worse than baseline" in res.stdout
    assert "sdp4bit-w32-seed2" in (out / "README.md").read_text()


@pytest.mark.parametrize("override, flags, message", [
    ({"design": {**cs.DESIGN, "--steps": "512"}}, [],
     "runs differ in their design: --steps"),
    ({"data": {"train_sha256": "f" * 64, "val_sha256": "b" * 64}}, [], "runs differ in their data: train_sha256"),
    ({"code_sha": "9999"}, ["--same-commit"], "--same-commit: runs were made with different code"),
])
def test_report_refuses_runs_it_cannot_pair(tmp_path, override, flags, message, study):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _synthetic_run(runs, "baseline", 8, seed, 2.0 + seed)
    _synthetic_run(runs, "sdp4bit", 8, 0, 2.0, **override)
    res = study("report", "--runs-dir", str(runs), "--out", str(tmp_path / "out"), *flags)
    assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    if flags:  # the same runs without --same-commit pair fine: code versions are recorded, not required
        assert study("report", "--runs-dir", str(runs), "--out", str(tmp_path / "out")).returncode == 0


def test_a_design_recorded_before_weight_decay_on_existed_reads_as_all(tmp_path, study):
    """Runs recorded before --train.weight_decay_on trained with weight decay on every parameter: they
    pair with runs that record "all" (report) and continue under this design (run); "matrices" is refused."""
    old = {k: v for k, v in cs.DESIGN.items() if k != "--train.weight_decay_on"}
    matrices = {**cs.DESIGN, "--train.weight_decay_on": "matrices"}
    runs = tmp_path / "runs"
    _synthetic_run(runs, "baseline", 8, 0, 2.0, design=old)
    _synthetic_run(runs, "baseline", 8, 1, 2.1)
    _synthetic_run(runs, "sdp4bit", 8, 0, 2.0, design=old)
    res = study("report", "--runs-dir", str(runs), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["design"] == cs.DESIGN
    _synthetic_run(runs, "sdp4bit", 8, 1, 2.1, design=matrices)
    res = study("report", "--runs-dir", str(runs), "--out", str(tmp_path / "out2"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "runs differ in their design: --train.weight_decay_on all in baseline-w8-seed0, matrices in " \
           "sdp4bit-w8-seed1" in res.stderr

    data = {"train_sha256": "a" * 64, "val_sha256": "b" * 64}
    run = cs.Run("baseline", 8, 0)
    cs.check_recorded(run, {"design": old, "data": data}, data, tmp_path)  # continues
    with pytest.raises(sc.StudyError, match="was started with --train.weight_decay_on matrices, this design has all"):
        cs.check_recorded(run, {"design": matrices, "data": data}, data, tmp_path)


# ------------------------------------------------------------------------------- --peak-lr variant


def test_a_lower_peak_lr_is_a_study_of_its_own(tmp_path, options):
    """--peak-lr changes the peak and the final lr (a tenth of it) and nothing else in any command; the
    default keeps the recorded design's text exactly (runs made before the option stay this design)."""
    from halfbyte.train.config import parse_args

    assert cs.design_at(cs.PEAK_LR) == cs.DESIGN and cs.DESIGN["--lr"] == "1.5e-3"
    low = cs.design_at("5e-4")
    assert {k: v for k, v in low.items() if low[k] != cs.DESIGN[k]} == {"--lr": "5e-4", "--schedule.min_lr": "5e-5"}
    train = ["python3", "-m", "halfbyte", "train"]
    for run, twin in zip(cs.grid(peak_lr="5e-4"), cs.grid()):
        assert run.name == twin.name and run.design == low and twin.design == cs.DESIGN
        a, b = options(run.argv(tmp_path / "d.bin", tmp_path, train)), options(twin.argv(tmp_path / "d.bin", tmp_path, train))
        assert {k for k in a if a[k] != b[k]} == {"--lr", "--schedule.min_lr"}
        assert run.provenance({})["design"] == low
    cfg = parse_args(cs.grid(peak_lr="5e-4")[0].argv(tmp_path / "d.bin", tmp_path, []))
    assert (cfg.optim.lr, cfg.schedule.min_lr) == (5e-4, 5e-5)
    assert [cs.lr_text(v) for v in (1.5e-3, 5e-4, 7.5e-4, 1e-3, 0.0005)] == ["1.5e-3", "5e-4", "7.5e-4", "1e-3", "5e-4"]


def test_peak_lr_moves_the_default_directories_and_refuses_mixing(tmp_path, data, study, dirs):
    plan = study("plan", "--peak-lr", "0.0005", "--data", str(data))
    assert plan.returncode == 0, plan.stderr
    commands = [line for line in plan.stdout.splitlines() if " -m halfbyte train " in line]
    assert len(commands) == len(cs.grid())
    assert all("--lr 5e-4 --schedule.min_lr 5e-5" in c and "--out runs/convergence-lr5e-4/" in c for c in commands)
    assert "peak lr 5e-4" in plan.stdout.splitlines()[0]
    # a run directory of the default design is refused by the variant's run, in one line
    _synthetic_run(tmp_path, "baseline", 8, 0, None)
    refused = study("run", *dirs, "--peak-lr", "5e-4", "--data", str(data), "--deadline-s", "60")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "was started with --lr 1.5e-3, this design has 5e-4" in refused.stderr
    for bad in ("0", "-1e-3", "abc", "nan", "inf"):
        res = study("plan", f"--peak-lr={bad}")
        assert res.returncode == 2 and "--peak-lr: expected a learning rate > 0" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr


def test_report_at_a_peak_lr_pairs_its_runs_and_refuses_the_other_designs(tmp_path, study):
    runs, out = tmp_path / "runs", tmp_path / "out"
    low = cs.design_at("5e-4")
    for seed, (base, arm) in enumerate([(2.0, 2.01), (2.1, 2.1), (1.9, 1.92)]):
        _synthetic_run(runs, "baseline", 8, seed, base, design=low)
        _synthetic_run(runs, "sdp4bit", 8, seed, arm, design=low)
    res = study("report", "--peak-lr", "5e-4", "--runs-dir", str(runs), "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["design"] == low and summary["comparisons"]["w8"]["arms"]["sdp4bit"]["n_seeds"] == 3
    assert "peak lr 5e-4" in (out / "README.md").read_text()
    # the same runs under the default design's report: refused, with the option that reads them
    wrong = study("report", "--runs-dir", str(runs), "--out", str(tmp_path / "out2"))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "were made with --lr 5e-4 (this report's design has 1.5e-3); pass --peak-lr 5e-4" in wrong.stderr
    assert not (tmp_path / "out2").exists()


def _resumable(run_dir: Path, step: int, data: Path) -> None:
    """A run of the grid cut at `step`, with its checkpoint: it resumes there."""
    (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{step:06d}" / sc.CHECKPOINT_MARKER).write_text("ok\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n"
                                                   for s in range(1, step + 1)))
    run = next(r for r in cs.grid(2) if r.name == run_dir.name)
    sc.write_json(run_dir / "provenance.json", {**run.provenance(sc.data_identity(data)), "segments": []})


def test_a_run_the_gate_refuses_on_a_crowded_gpu_starts_once_the_gpu_frees(tmp_path, data, study, dirs, fake_train):
    # 2026-12-03, third call: two runs were refused while three shared the GPU and never looked at
    # again, though the GPU then ran one run alone for 120 s and a fresh run ended in 165 s. Here (a
    # step: 2 ms x the live fakes) a short resumed run ends first at ~3.9 s and gives the gate its
    # estimate; the fresh seventh run then needs 1.1 x ~6 x 2 s, past the stop at ~15.6 s, so it waits;
    # once the five long runs end (~10.9 s) it fits alone (~2.3 s) and must start and end in this call.
    # The short run's 324 steps keep the fakes' start-up (counted as sharing before they share) a
    # small part of its time alone: with 124 it once let the fresh run in on a loaded host.
    shared = tmp_path / "gpu"
    shared.mkdir()
    short = tmp_path / "baseline-w8-seed0"
    _resumable(short, 700, data)
    longs = ["sdp4bit-w8-seed0", "qw4-w8-seed0", "zeropp-w8-seed0", "baseline-w8-seed1", "sdp4bit-w8-seed1"]
    fresh = "qw4-w8-seed1"
    res = study("run", *dirs, "--data", str(data), "--only", ",".join([short.name, *longs, fresh]),
                "--parallel", "6", "--poll-s", "0.05", "--deadline-s", "16.6", "--stop-margin-s", "1",
                "--train-cmd", fake_train, env={"FAKE_STEP_S": "0.002", "FAKE_SHARED": str(shared)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "shed" not in res.stdout
    assert [sc.status(tmp_path / n, cs.STEPS) for n in [short.name, *longs, fresh]] == ["done"] * 7, res.stdout
    (segment,) = sc.read_provenance(tmp_path / fresh)["segments"]
    ends = [sc.read_provenance(tmp_path / n)["segments"][-1]["end_utc"] for n in longs]
    assert segment["start_utc"] >= min(ends)  # it waited for the GPU to free, not for nothing


def test_a_call_killed_at_its_limit_keeps_the_runs_that_ended_in_its_snapshot(tmp_path, data, dirs, fake_train):
    # 2026-12-03, ninth session: a device call was killed at its limit (395 s, where the deadline said
    # 445) before its closing `tar`, and six runs that had finished at 325-330 s came back with nothing.
    # With --snapshot the launcher rewrites a tarball of the runs after every segment's end: here the
    # launcher is killed (SIGKILL, its whole process group, as the device does) while the long run
    # runs, and the snapshot must hold the short run, done, without checkpoints.
    short = tmp_path / "baseline-w8-seed0"
    _resumable(short, 900, data)
    out = tmp_path / "out"
    out.mkdir()
    snap = out / "runs.tgz"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "run", *dirs, "--data", str(data), "--only",
                             f"{short.name},sdp4bit-w8-seed0", "--parallel", "2", "--poll-s", "0.05",
                             "--deadline-s", "60", "--train-cmd", fake_train, "--snapshot", str(snap)],
                            env={**os.environ, "FAKE_STEP_S": "0.01"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while sc.status(short, cs.STEPS) != "done" or not snap.is_file():
            assert proc.poll() is None and time.monotonic() - t0 < 30, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.05)
        time.sleep(0.5)  # the long run goes on; the snapshot of the short run's end is written
        assert proc.poll() is None  # still running: killed at "the limit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with tarfile.open(snap) as tar:
        names = tar.getnames()
        metrics = tar.extractfile(f"{short.name}/metrics.jsonl").read().decode()
        provenance = json.loads(tar.extractfile(f"{short.name}/provenance.json").read())
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == list(range(1, cs.STEPS + 1))
    assert provenance["segments"][-1]["to_step"] == cs.STEPS and provenance["segments"][-1]["exit_code"] == 0
    assert not any("checkpoints" in n for n in names)
    assert f"{short.name}/command.txt" in names and not any(n.endswith(".tmp") for n in os.listdir(out))


def test_snapshot_needs_an_existing_directory(tmp_path, data, study, dirs, fake_train):
    res = study("run", *dirs, "--data", str(data), "--only", "baseline-w8-seed0", "--deadline-s", "60",
                "--train-cmd", fake_train, "--snapshot", str(tmp_path / "no" / "runs.tgz"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "--snapshot" in res.stderr and "no such directory" in res.stderr
    assert not (tmp_path / "baseline-w8-seed0").exists()


# ------------------------------------------------------------------- launchers sharing one GPU


def test_keep_count_counts_the_other_launchers_runs_that_stay():
    # keeping 1 of 2 beside 2 runs of another launcher speeds it by 4/3, not 2: 1.1 x 75 s > 80 s
    assert sc.keep_count([100.0, 100.0], 80.0) == 1
    assert sc.keep_count([100.0, 100.0], 80.0, others=2) == 2  # nothing ends either way: keep both
    assert sc.keep_count([100.0, 100.0], 85.0, others=2) == 1


def test_peers_count_the_live_runs_of_other_live_launchers(tmp_path):
    mine = sc.Peers(tmp_path / "launchers")
    mine.publish(2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sc.write_json(tmp_path / "launchers" / f"{int(dead.stdout)}.json", {"live": 5})  # its launcher has ended
    assert mine.others() == 0
    sc.write_json(tmp_path / "launchers" / f"{os.getppid()}.json", {"live": 3})  # a live process
    assert mine.others() == 3
    mine.close()
    assert not (tmp_path / "launchers" / f"{os.getpid()}.json").exists()


def test_a_launcher_sees_the_runs_of_another_and_starts_once_they_end(tmp_path, data, fake_train):
    # Another study's launcher holds three runs on the "GPU" (a step: 2 ms x the live fakes; T = 1024
    # steps alone = ~2 s): a live process's file in the launchers' directory says 3, and three files
    # in FAKE_SHARED slow every step 4x. This launcher resumes a run from step 700 (~2.6 s), then has a
    # fresh run: beside the three it would take 1.1 x 4 T, past the stop at 8 s, so it is refused. Once the
    # other launcher's runs end (their files go) it fits alone (1.1 T) and must start and end in this
    # call. Counting only its own runs, the launcher took the short run's 4x slower rate for its time
    # alone, refused the fresh run and exited (the eighth session's two launchers, 2026-12-03).
    shared = tmp_path / "gpu"
    shared.mkdir()
    runs = tmp_path / "runs"
    _resumable(runs / "baseline-w8-seed0", 700, data)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    peers = tmp_path / ".launchers"
    peers.mkdir()
    sc.write_json(peers / f"{other.pid}.json", {"live": 3})
    for k in range(3):
        (shared / f"other-{k}").touch()
    launcher = subprocess.Popen([sys.executable, str(SCRIPT), "run", "--runs-dir", str(runs), "--done-in",
                                 str(tmp_path / "none"), "--data", str(data), "--only",
                                 "baseline-w8-seed0,baseline-w8-seed1", "--parallel", "1", "--poll-s", "0.05",
                                 "--deadline-s", "9", "--stop-margin-s", "1", "--train-cmd", fake_train],
                                env={**os.environ, "FAKE_STEP_S": "0.002", "FAKE_SHARED": str(shared)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while sc.status(runs / "baseline-w8-seed0", cs.STEPS) != "done":
            assert time.monotonic() - t0 < 30
            time.sleep(0.02)
        time.sleep(0.3)  # the launcher has looked at the fresh run beside the other launcher's three
        assert not (runs / "baseline-w8-seed1").exists()  # refused while they run
        other.kill()
        other.wait()
        for k in range(3):
            (shared / f"other-{k}").unlink()
        ended = sc.utc_now()
        out, _ = launcher.communicate(timeout=60)
    finally:
        other.kill()
        launcher.kill()
    assert launcher.returncode == 0, out
    assert sc.status(runs / "baseline-w8-seed1", cs.STEPS) == "done", out
    (fresh,) = sc.read_provenance(runs / "baseline-w8-seed1")["segments"]
    assert fresh["start_utc"] >= ended, out  # it waited for the other launcher's runs to end
    assert not (peers / f"{launcher.pid}.json").exists()  # the launcher removed its file
