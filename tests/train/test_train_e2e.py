"""`halfbyte train` end to end: 2 local gloo workers on a very small GPT over the built-in corpus."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=8",
         "--lr=1e-2", "--warmup_steps=2", "--min_lr=1e-3", "--eval_tokens=512", "--log_interval=1",
         "--sample_tokens=8"]


def _train(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "halfbyte", "train", *SMALL, *args],
                          capture_output=True, text=True, timeout=timeout)


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "halfbyte", "train", *SMALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_metrics(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_train_writes_outputs_and_resume_continues_the_curve(tmp_path):
    out = tmp_path / "run"
    # micro-batch 2 of a per-rank 4: two accumulation passes per step, only the second communicates
    run = _train("--steps=8", "--eval_interval=4", "--checkpoint_interval=4", "--keep_checkpoints=2",
                 "--micro_batch_size=2", "--check_replicas_interval=3", f"--out={out}")
    assert run.returncode == 0, run.stderr
    first = _metrics(out)
    assert [r["step"] for r in first] == list(range(1, 9))
    assert first[0]["loss"] > 8.0 and first[-1]["loss"] < first[0]["loss"] - 1.0  # from ~ln(4096) down
    assert [r["step"] for r in first if "val_loss" in r] == [4, 8] and first[-1]["val_loss"] < first[3]["val_loss"]
    # sdp4bit: with 1 rank per emulated node everything crosses the "inter-node" link, in int4 (~4x < bf16)
    assert first[-1]["wire_intra_bytes"] == 0 and 3.0 < first[-1]["wire_bf16_bytes"] / first[-1]["wire_inter_bytes"] < 4.1
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((out / "tensorboard").iterdir())
    assert (out / "loss.png").stat().st_size > 1000 and (out / "sample.txt").read_text().startswith("ROMEO:")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000008"]
    assert "done: step 8/8" in run.stdout and "wire (all ranks)" in run.stdout

    # resuming from step 4 retraces steps 5..8: same data, same optimizer state, same rounding seeds
    run = _train("--steps=8", "--eval_interval=4", "--checkpoint_interval=4", "--keep_checkpoints=2",
                 "--micro_batch_size=2", f"--out={out}", f"--resume={out / 'checkpoints' / 'step_000004'}")
    assert run.returncode == 0, run.stderr
    again = _metrics(out)
    assert [r["step"] for r in again] == list(range(1, 9))
    for a, b in zip(first, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), (a, b)
        assert a["wire_inter_bytes"] == b["wire_inter_bytes"]

    # --resume alone takes the newest checkpoint and the run's own options; more steps need --replan,
    # and the learning rate goes on from where it was (no jump back up the cosine): the finished
    # run's schedule had reached min_lr (1e-3), so the extension stays there
    run = _train("--steps=10", f"--out={out}", "--resume")
    assert run.returncode == 2 and "--train.steps would change what the run computes" in run.stderr
    run = _train("--steps=10", f"--out={out}", "--resume", "--replan")
    assert run.returncode == 0, run.stderr
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[7]["lr"] > 1e-3 and records[8]["lr"] == pytest.approx(1e-3) == records[9]["lr"]
    assert "resuming from" in run.stderr + run.stdout
    run = _train(f"--out={out}", "--resume", "auto")  # the run's saved options: steps 10, finished
    assert run.returncode == 0 and "finished at step 10 of 10; nothing to do" in run.stdout, run.stdout


@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _start("--steps=100000", "--checkpoint_interval=0", "--eval_interval=0", f"--out={out}")
    _wait_for_steps(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    step = _metrics(out)[-1]["step"]
    assert f"stopped at step {step}" in stdout
    assert (out / "checkpoints" / f"step_{step:06d}" / "COMPLETE").exists()


@pytest.mark.timeout(300)
def test_a_crashed_worker_stops_the_run_with_an_error(tmp_path):
    out = tmp_path / "run"
    proc = _start("--steps=100000", "--checkpoint_interval=0", "--eval_interval=0", f"--out={out}")
    _wait_for_steps(out, proc, 1)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 60
    # the parent names the first rank that reported: the killed one, or its peer whose link broke
    assert proc.returncode == 1 and "a worker failed" in stderr and "rank " in stderr, stderr


@pytest.mark.timeout(300)
def test_train_on_prepared_data(tmp_path):
    from halfbyte.train.data import read_builtin_plays

    (tmp_path / "corpus").mkdir()
    for i, play in enumerate(read_builtin_plays()[:2]):
        (tmp_path / "corpus" / f"play{i}.txt").write_text(play)
    prep = subprocess.run([sys.executable, "-m", "halfbyte", "prepare-data", str(tmp_path / "corpus"),
                           "--out", str(tmp_path / "data.bin")], capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "run"
    run = _train("--steps=3", f"--data={tmp_path / 'data.bin'}", f"--out={out}")
    assert run.returncode == 0, run.stderr
    assert "val_loss" in _metrics(out)[-1] and (out / "sample.txt").exists()  # val file and tokenizer found


@pytest.mark.timeout(300)
def test_two_deterministic_runs_are_equal(tmp_path):
    # --train.deterministic: a run trains with torch's deterministic kernels (no op of the GPT lacks
    # one), and two runs of one command retrace each other
    def losses(out: Path) -> list[tuple[int, float, float | None]]:
        run = _train("--steps=6", "--eval_interval=3", "--virtual-ranks=4", "--virtual-gpus-per-node=2",
                     "--sample_tokens=0", "--train.deterministic=true", f"--out={out}")
        assert run.returncode == 0, run.stderr
        return [(r["step"], r["loss"], r.get("val_loss")) for r in _metrics(out)]

    first = losses(tmp_path / "a")
    assert [s for s, _, _ in first] == list(range(1, 7))
    assert first == losses(tmp_path / "b")


def test_the_deterministic_switch_sets_torch_and_cublas():
    code = ("import os, torch; from halfbyte.train.loop import use_deterministic_kernels; "
            "assert not torch.are_deterministic_algorithms_enabled(); use_deterministic_kernels(); "
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'], "
            "torch.backends.cudnn.benchmark)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", ":4096:8", "False"]
