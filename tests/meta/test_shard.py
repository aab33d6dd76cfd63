"""`pytest --shard I/K` (tests/conftest.py): the suite in K disjoint parts that together are the whole
suite, so that a GPU machine whose calls are shorter than the suite runs it in K calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests/quant"  # many small, parametrized tests: collecting them takes seconds


def collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)


def node_ids(out: str) -> list[str]:
    return [line for line in out.splitlines() if "::" in line]


def test_shards_are_disjoint_and_together_the_whole_suite():
    whole = node_ids(collect(TARGET).stdout)
    assert len(whole) > 30
    parts = [node_ids(collect(TARGET, "--shard", f"{i}/3").stdout) for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert all(abs(len(p) - len(whole) / 3) <= 1 for p in parts)  # round robin: balanced by count
    # neighbours (often the same test's parameters, of like cost) go to different shards
    assert whole[0] in parts[0] and whole[1] in parts[1] and whole[2] in parts[2]


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3"])
def test_a_bad_shard_is_a_one_line_usage_error(bad):
    done = collect(TARGET, "--shard", bad)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert f"--shard: expected I/K with 1 <= I <= K, got '{bad}'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("env, message", [
    ({"SHARD": "3/2"}, "SHARD must be I/K with 1 <= I <= K, got '3/2'"),
    ({"SHARD": "1-2"}, "SHARD must be I/K with 1 <= I <= K, got '1-2'"),
    ({"JOBS": "many"}, "JOBS must be a number of workers (0: serial), got 'many'"),
])
def test_gpu_tests_sh_refuses_a_bad_shard_or_job_count_before_anything_runs(tmp_path, env, message):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_tests.sh"), str(tmp_path / "log")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"gpu_tests.sh: {message}"
    assert not (tmp_path / "log").exists()
