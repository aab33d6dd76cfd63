"""Fault injection: `kill -9` of the launching process must take its workers with it within seconds, before
they write anything more (the issue: after `kill -9` of `halfbyte train` the workers trained on for 81 s and
wrote outputs).

This file is also the launching process: `python this_file spawn DIR` runs 2 gloo workers through `spawn`,
`python this_file watchdog DIR` one bare 'spawn' child that has only the portable fallback (the orphan
watchdog thread, no Linux parent-death signal). Every worker appends `pid time` lines to DIR/rank<r>.beat.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BEAT_S = 0.05


def _heartbeat(out: str, rank: int, collective: bool) -> None:
    """Forever: (an all_reduce with the peer, when there is a process group,) then one heartbeat line."""
    import torch
    import torch.distributed as dist

    path = Path(out) / f"rank{rank}.beat"
    while True:
        if collective:
            dist.all_reduce(torch.ones(1))
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {time.time():.6f}\n")
        time.sleep(BEAT_S)


def _spawned_worker(out: str) -> None:
    _heartbeat(out, int(os.environ["RANK"]), collective=True)


def _watchdog_only_child(out: str) -> None:
    from halfbyte.comm.launch import _start_orphan_watchdog

    _start_orphan_watchdog()
    _heartbeat(out, 0, collective=False)


def _beats(path: Path) -> list[tuple[int, float]]:
    complete = path.read_text().split("\n")[:-1] if path.exists() else []  # not a line being written
    return [(int(pid), float(t)) for pid, t in (line.split() for line in complete)]


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat) while it runs; None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else fields[19]


def _kill_parent_and_time_the_workers(mode: str, nworkers: int, tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, __file__, mode, str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    paths = [tmp_path / f"rank{r}.beat" for r in range(nworkers)]
    workers: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + 90
        while not all(len(_beats(p)) >= 3 for p in paths):
            assert parent.poll() is None, parent.communicate()[1].decode()
            assert time.monotonic() < deadline, "the workers never started beating"
            time.sleep(0.1)
        workers = {pid: _start_time(pid) for pid in {_beats(p)[0][0] for p in paths}}
        assert len(workers) == nworkers and all(workers.values())

        os.kill(parent.pid, signal.SIGKILL)
        killed_at = time.time()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_start_time(pid) == start for pid, start in workers.items()):
            assert time.monotonic() < deadline, f"workers still running 10 s after kill -9 of their parent: {workers}"
            time.sleep(0.02)
        gone_after = time.time() - killed_at
        print(f"{mode}: {nworkers} worker(s) gone {gone_after * 1000:.0f} ms after kill -9 of the parent")
        for path in paths:  # nothing written once the parent was dead (allowing for the kill's own latency)
            assert _beats(path)[-1][1] < killed_at + 0.5, path.read_text()[-200:]
    finally:
        for pid, start in workers.items():  # a failing run must not leave orphans behind
            if _start_time(pid) == start:
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.timeout(120)
def test_spawned_workers_die_with_a_killed_parent(tmp_path):
    _kill_parent_and_time_the_workers("spawn", 2, tmp_path)


@pytest.mark.timeout(120)
def test_orphan_watchdog_alone_ends_a_child_whose_parent_was_killed(tmp_path):
    """The portable fallback (macOS has no parent-death signal) on its own, without prctl."""
    _kill_parent_and_time_the_workers("watchdog", 1, tmp_path)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "spawn":
        from halfbyte.comm import spawn

        spawn(_spawned_worker, 2, out, timeout_s=300)
    else:
        child = multiprocessing.get_context("spawn").Process(target=_watchdog_only_child, args=(out,))
        child.start()
        child.join()
