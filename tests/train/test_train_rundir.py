"""A run's directory is never lost: a new run refuses an occupied --out, --overwrite deletes the old
run only after the new one's first checkpoint, --resume auto starts or continues, damaged
checkpoints and bad paths are one line and exit 2 before training, and a run whose gradients stay
non-finite stops with a message, strict-JSON metrics and no non-finite checkpoint. Virtual ranks on
the CPU keep these runs in this process (the directory logic is the same for workers)."""

import json

import pytest

import halfbyte.train.loop as loop
from halfbyte.engine import checkpoint
from halfbyte.train.cli import train_main
from halfbyte.train.rundir import PREVIOUS

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=4",
         "--eval_tokens=256", "--log_interval=1", "--sample_tokens=0", "--virtual-ranks=2",
         "--train.device=cpu", "--eval_interval=0"]


def _run(out, *args) -> int:
    return train_main([*SMALL, f"--out={out}", *args])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_refuses_the_directory_and_keeps_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps=3") == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert _run(out, "--steps=3") == 2
    message = _error(capsys)
    assert "holds an earlier run (1 checkpoint(s), the newest step_000003)" in message
    assert "--resume auto" in message and "--overwrite" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before and _steps(out) == [1, 2, 3]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps=4") == 0
    old_metrics = (out / "metrics.jsonl").read_text()

    # A new run that fails at its second step, before any checkpoint: the old run comes back whole.
    real_step = loop.Ranks.train_step

    def fail_at_step_2(self, lr):
        if self.engine.step_count == 1:
            raise RuntimeError("injected failure")
        return real_step(self, lr)

    monkeypatch.setattr(loop.Ranks, "train_step", fail_at_step_2)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(out, "--steps=6", "--overwrite", "--checkpoint_interval=3")
    assert (out / "metrics.jsonl").read_text() == old_metrics and not (out / PREVIOUS).exists()
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_000004"]

    # A new run that gets to its first checkpoint replaces the old one.
    monkeypatch.setattr(loop.Ranks, "train_step", real_step)
    assert _run(out, "--steps=6", "--overwrite", "--checkpoint_interval=3", "--keep_checkpoints=5") == 0
    assert _steps(out) == list(range(1, 7)) and not (out / PREVIOUS).exists()
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step_000003", "step_000006"]


def test_resume_auto_starts_an_empty_directory_and_continues_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps=4", "--checkpoint_interval=2", "--keep_checkpoints=2", "--resume", "auto") == 0
    assert "resuming" not in capsys.readouterr().out
    (out / "checkpoints" / "step_000004").rename(out / "checkpoints" / "moved-away")  # back to step 2
    assert _run(out, "--resume", "auto") == 0  # the run's own options: 4 steps
    assert "resuming from" in capsys.readouterr().out and _steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "has 100 of its"),
    ("meta", "unreadable meta.json"),
    ("metadata-deleted", "has no DCP .metadata file"),
    ("metadata-garbage", "unreadable DCP .metadata"),
    ("incomplete", "missing or incomplete (no COMPLETE marker)"),
    ("meta-no-extra", "meta.json lacks its run's entry (extra)"),  # a KeyError traceback before
])
def test_a_damaged_checkpoint_is_one_line_before_training(damage, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps=2") == 0
    ckpt = out / "checkpoints" / "step_000002"
    if damage == "truncate":
        data = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "meta":
        (ckpt / "meta.json").write_text("{not json")
    elif damage == "metadata-deleted":
        (ckpt / ".metadata").unlink()
    elif damage == "metadata-garbage":
        (ckpt / ".metadata").write_bytes(b"\x80garbage")
    elif damage == "meta-no-extra":
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["extra"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    else:
        (ckpt / checkpoint.MARKER).unlink()
    capsys.readouterr()
    assert _run(out, f"--resume={ckpt}") == 2
    line = _error(capsys)
    assert message in line and str(ckpt) in line, line


@pytest.mark.timeout(300)
def test_a_checkpoint_with_garbage_data_of_the_right_size_is_one_line_from_real_workers(tmp_path, capfd):
    """It passes the up-front verify; the workers' load failed with DCP's CheckpointException (a
    BaseException), which the load did not catch: every worker's traceback and exit code 1."""
    out = tmp_path / "run"
    workers = [a for a in SMALL if not a.startswith(("--virtual-ranks", "--train.device"))] + ["--workers=2"]
    assert train_main([*workers, f"--out={out}", "--steps=2"]) == 0
    ckpt = out / "checkpoints" / "step_000002"
    for data in ckpt.glob("*.distcp"):
        data.write_bytes(b"\x80" * data.stat().st_size)
    capfd.readouterr()
    assert train_main([*workers, f"--out={out}", f"--resume={ckpt}", "--steps=4", "--train.replan"]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "step/s" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"halfbyte train: error: checkpoint {ckpt} could not be read"), err
    assert "it is damaged" in lines[0]


@pytest.mark.parametrize("error, cause", [
    # torch's zip reader on a .distcp with flipped bytes: four more sentences of advice followed
    (RuntimeError("PytorchStreamReader failed reading zip archive: invalid header or archive is corrupted. This "
                  "is an internal miniz error. If you are seeing this error, there is a high likelihood that your "
                  "checkpoint file is corrupted."),
     "RuntimeError: PytorchStreamReader failed reading zip archive: invalid header or archive is corrupted"),
    (ValueError("first line\nsecond line"), "ValueError: first line"),
    (KeyError("model.wte.weight"), "KeyError: 'model.wte.weight'"),
    (OSError(), "OSError: no message"),
    (ValueError("size 1.5 MB of 3.0 MB"), "ValueError: size 1.5 MB of 3.0 MB"),  # a '.' inside a number stays
])
def test_a_dcp_failure_reads_as_its_first_sentence(error, cause):
    assert checkpoint.dcp_cause(error) == cause


@pytest.mark.parametrize("where, message", [("file", "is a file"), ("under-a-file", "f is a file, not a directory")])
def test_bad_output_paths_are_one_line(where, message, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    assert _run(out, "--steps=2") == 2
    assert message in _error(capsys)


def test_gradients_that_stay_non_finite_stop_the_run_without_a_bad_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e30: the first update sends the weights to ~1e30, the next forward overflows to nan
    assert _run(out, "--steps=40", "--lr=1e30", "--schedule.warmup_steps=0", "--schedule.min_lr=1e30",
                "--checkpoint_interval=5") == 2
    line = _error(capsys)
    assert "10 steps in a row had non-finite gradients" in line and "lower --lr" in line
    records = [json.loads(l, parse_constant=pytest.fail) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["loss"] is None for r in records)  # strict JSON: null, never NaN
    first_skip = min(r["step"] for r in records if r["skipped_steps"])
    for ckpt in checkpoint.complete_checkpoints(out / "checkpoints"):
        step = json.loads((ckpt / "meta.json").read_text())["extra"]["step"]
        assert step < first_skip, (ckpt, first_skip)  # nothing saved once the steps were skipped
