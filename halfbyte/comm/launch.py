"""Start N local worker processes (one per rank) and collect their results; never hang, never leave a
worker behind.

`spawn(fn, 4)` runs `fn(*args)` in 4 fresh processes (multiprocessing 'spawn' context) with the
environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free port of 127.0.0.1), initializes the default process group (gloo unless told
otherwise), and returns `[result of rank 0, result of rank 1, ...]`. The first rank that raises or
dies takes the others down with it, and the parent raises `WorkerError` naming that rank and its
traceback; an overall timeout bounds everything. `fn` must be importable (module level), results
must be picklable.

**Parent death.** Workers never outlive the process that called `spawn`, however it ends (`kill -9`
included): two mechanisms, set up first thing in each worker, before `fn` runs:
- Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), then a check that the parent is still the launcher (it may
  have died before prctl, and then no signal comes). The kernel sends the signal when the *thread* that
  started the worker ends; `spawn` starts them from the calling thread and returns only once they are
  gone, so for `spawn` that is the same as the process.
- Everywhere (the fallback, e.g. macOS): a watchdog thread waits on the pipe multiprocessing keeps from
  the parent (`multiprocessing.parent_process().sentinel`), which reaches end-of-file when the parent is
  gone, and ends the worker with os._exit.
Neither lets the worker's own code run on the way out, deliberately: in halfbyte training SIGTERM / SIGINT
mean "save a checkpoint, then stop" and exit handlers flush event files, outputs that a run must not write
once the process that owns it is gone.
"""

from __future__ import annotations

import ctypes
import datetime
import io
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing import connection
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Default process-group timeout: long enough for a first step that compiles, short enough that a
#: rank stuck in a collective surfaces as an error instead of a hang.
DEFAULT_PG_TIMEOUT_S = 300.0

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerError(RuntimeError):
    """A spawned worker raised, died, or the run timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_process_group_from_env(backend: str | None = None, *,
                                timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> str:
    """Initialize the default process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun
    or `spawn`). backend None: nccl when CUDA is available, else gloo. With nccl, selects the GPU
    LOCAL_RANK first. Returns the backend. A no-op when already initialized."""
    if dist.is_initialized():
        return dist.get_backend()
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"environment variable {key} is not set: launch with torchrun or "
                             "halfbyte.comm.launch.spawn")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return backend


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the launcher (see the module docstring)."""
    if sys.platform.startswith("linux"):
        # A failure here (-1) leaves the watchdog, which covers the same case a moment later.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _start_orphan_watchdog()
    if os.getppid() != parent_pid:  # the launcher died before prctl: no signal will come
        os._exit(1)


def _start_orphan_watchdog() -> None:
    """A thread that ends this process once its parent is gone: the pipe multiprocessing keeps from the
    parent reaches end-of-file then. os._exit: nothing of the worker's own runs on the way out."""
    sentinel = mp.parent_process().sentinel

    def watch() -> None:
        connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="halfbyte-orphan-watchdog", daemon=True).start()


def _worker(rank: int, nprocs: int, port: int, env: dict[str, str], backend: str | None,
            pg_timeout_s: float, parent_pid: int, results: Any, fn: Callable[..., Any], args: tuple) -> None:
    _die_with_parent(parent_pid)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ranks share the host's cores: one rank must not spin threads on all of them.
    if "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        if backend is not None:
            init_process_group_from_env(backend, timeout_s=pg_timeout_s)
        value = fn(*args)
        # Plain pickle (not torch's shared-memory reducers): the child may exit before the parent
        # reads, and a result is small.
        buf = io.BytesIO()
        pickle.dump(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit non-zero
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 120.0,
          env: dict[str, str] | None = None, backend: str | None = "gloo",
          pg_timeout_s: float | None = None) -> list[Any]:
    """Run `fn(*args)` on `nprocs` local ranks; return their results in rank order.

    backend: process group the workers get before `fn` runs ("gloo", "nccl"), or None to leave
    initialization to `fn` (call `init_process_group_from_env`). env: extra environment variables.
    pg_timeout_s: process-group timeout (default: min(timeout_s, 300 s)).
    Raises WorkerError naming the first failing rank, or on timeout; every worker is gone by then. The
    workers die with this process if it dies first (on Linux, with the thread that called spawn: it is
    the one that waits here until they are gone).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    pg_timeout = pg_timeout_s if pg_timeout_s is not None else min(timeout_s, DEFAULT_PG_TIMEOUT_S)
    procs = [
        ctx.Process(target=_worker, daemon=True, name=f"halfbyte-rank{rank}",
                    args=(rank, nprocs, port, dict(env or {}), backend, pg_timeout, os.getpid(), results,
                          fn, args))
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    try:
        while len(values) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                _check_alive(procs, values, results)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(nprocs)) - set(values))
                    raise WorkerError(f"timed out after {timeout_s:.0f} s waiting for ranks {missing}")
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {nprocs} failed:\n{payload}")
            values[rank] = pickle.loads(payload)
    except BaseException:
        _stop(procs, grace_s=0.0)
        raise
    _stop(procs, grace_s=10.0)  # all reported: let them tear down their process groups
    return [values[r] for r in range(nprocs)]


def _check_alive(procs: list, values: dict[int, Any], results: Any) -> None:
    """A rank that exited without reporting (killed, segfault, os._exit) is a failure too."""
    for rank, p in enumerate(procs):
        if rank not in values and p.exitcode is not None:
            # Its report may still be in flight: give the queue a moment before blaming the exit.
            try:
                r, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                raise WorkerError(f"rank {rank} of {len(procs)} died with exit code {p.exitcode} "
                                  "without reporting a result") from None
            if not ok:
                raise WorkerError(f"rank {r} of {len(procs)} failed:\n{payload}")
            values[r] = pickle.loads(payload)
            return


def _stop(procs: list, grace_s: float) -> None:
    """Join for up to grace_s, then SIGTERM, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)
