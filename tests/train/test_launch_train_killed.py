"""Fault injection on the real command: `kill -9` of the main `halfbyte train` process takes its local
workers with it, and nothing in the run directory changes after the kill (the issue: they trained on for
81 s and wrote outputs)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=8",
         "--eval_tokens=512", "--log_interval=1", "--sample_tokens=8"]


def _running(pid: int, start: str) -> bool:
    """Whether pid is still the process that started at `start` (/proc/PID/stat field 22), not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and fields[19] == start


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[19]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(180)
def test_kill_9_of_halfbyte_train_stops_its_workers_and_their_outputs(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "halfbyte", "train", *SMALL, "--steps=100000",
                             "--checkpoint_interval=0", "--eval_interval=0", f"--out={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: dict[int, str] = {}
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.1)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = {int(p): _start_time(int(p)) for p in children
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()}
        assert len(workers) == 2

        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_running(pid, start) for pid, start in workers.items()):
            assert time.monotonic() < deadline, "workers still running 10 s after kill -9 of halfbyte train"
            time.sleep(0.02)
        written = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
        assert all(t < killed_at + 0.5 for t in written.values()), written
    finally:
        for pid, start in workers.items():  # a failing run must not leave orphans behind
            if _running(pid, start):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
