"""`halfbyte bench comm` without a launcher: local workers are gloo CPU processes even on a CUDA host,
and the JSON goes to ./runs/bench/ unless --out says otherwise."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist

from halfbyte.bench import comm as comm_bench
from halfbyte.comm import launch


def _spawn_in_this_process(monkeypatch):
    """A stand-in for launch.spawn that runs rank 0 of a world of one here, setting up what spawn's
    workers get (the launcher's environment, then the process group of `backend` unless None)."""
    calls = []

    def spawn(fn, nprocs, *args, backend="gloo", **kwargs):
        calls.append({"nprocs": nprocs, "backend": backend})
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launch.free_port())}.items():
            monkeypatch.setenv(key, value)
        try:
            if backend is not None:
                launch.init_process_group_from_env(backend)
            return [fn(*args)]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)

    monkeypatch.setattr(comm_bench, "spawn", spawn)
    return calls


def test_local_workers_are_gloo_cpu_processes_on_a_cuda_host(tmp_path, monkeypatch):
    """On a GPU host the default backend is NCCL (launch.default_backend): workers that initialized
    their own process group from it picked NCCL and cuda:<rank>, and failed past rank 0 on one GPU
    (seen as WorkerError from tests/bench/test_simulate.py on an H200). The bench decides instead."""
    monkeypatch.setattr(launch, "default_backend", lambda: "nccl")  # what a CUDA host answers
    calls = _spawn_in_this_process(monkeypatch)
    out = tmp_path / "comm.json"
    assert comm_bench.main(["--workers", "2", "--sizes", "4K", "--iters", "1", "--warmup", "0",
                            "--modes", "bf16,int4", "--out", str(out)]) == 0
    assert calls == [{"nprocs": 2, "backend": "gloo"}]
    meta = json.loads(out.read_text())["meta"]
    assert meta["backend"] == "gloo" and meta["world_size"] == 1


def test_results_default_under_runs_bench(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _spawn_in_this_process(monkeypatch)
    assert comm_bench.main(["--workers", "1", "--sizes", "4K", "--iters", "1", "--warmup", "0",
                            "--modes", "int4", "--collectives", "all_gather"]) == 0
    path = tmp_path / "runs" / "bench" / "comm-cpu-gloo-1x1.json"
    assert json.loads(path.read_text())["records"][0]["mode"] == "int4"
    assert "wrote runs/bench/comm-cpu-gloo-1x1.json" in capsys.readouterr().out
    assert not (tmp_path / "benchmarks").exists()


@pytest.mark.parametrize("argv, message", [
    # each ran: negative times, a warm-up silently of 0 calls, records of 0 values
    (["--iters", "-1"], "--iters must be >= 1, got -1"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--sizes", "0"], "--sizes must be >= 1 value each, got 0"),
    # each failed in the workers (a traceback, exit code 1), after the benchmark for --out
    (["--workers", "2", "--gpus-per-node", "3"], "--gpus-per-node 3 must divide --workers 2"),
    (["--out", "{tmp}"], "is a directory; name the file"),
    (["--out", "{tmp}/f/comm.json"], "f is a file, not a directory"),
    # several mistakes: every one is named, in one line (only the last one was)
    (["--out", "{tmp}", "--sizes", "0", "--workers", "2", "--gpus-per-node", "3"],
     "results.json; --sizes must be >= 1 value each, got 0; --gpus-per-node 3 must divide --workers 2"),
])
def test_bad_options_are_one_line_before_any_worker(argv, message, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(comm_bench, "spawn", refuse)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "f").write_text("x")
    assert comm_bench.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("halfbyte bench comm: ") and message in err, err
