"""The launcher returns results in rank order and turns any failing, dying or hanging rank into a
prompt WorkerError in the parent."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from halfbyte.comm import WorkerError, spawn


def _report(offset: int) -> tuple:
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return (dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), os.environ["HALFBYTE_X"], t.item())


def _fail_or_hang(mode: str) -> None:
    rank = int(os.environ["RANK"])  # "hang" runs without a process group
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("boom from the worker")
        if mode == "die":
            os._exit(7)
    if mode == "hang" or rank == 0:
        time.sleep(600)  # rank 0 waits forever: the launcher must not


@pytest.mark.timeout(60)
def test_results_in_rank_order_with_env():
    results = spawn(_report, 2, 10, env={"HALFBYTE_X": "y"}, timeout_s=50)
    assert results == [(0, 2, 0, "y", 21.0), (1, 2, 1, "y", 21.0)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode, message", [("raise", r"rank 1 of 2 failed:(.|\n)*boom from the worker"),
                                           ("die", "rank 1 of 2 died with exit code 7")])
def test_failing_rank_is_named_and_others_stopped(mode, message):
    start = time.monotonic()
    with pytest.raises(WorkerError, match=message):
        spawn(_fail_or_hang, 2, mode, timeout_s=50)
    assert time.monotonic() - start < 40


@pytest.mark.timeout(60)
def test_timeout_never_hangs():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="timed out"):
        spawn(_fail_or_hang, 2, "hang", timeout_s=8, backend=None)
    assert time.monotonic() - start < 30
