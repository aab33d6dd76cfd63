"""Start N local worker processes (one per rank) and collect their results; never hang, never leave a
worker behind, and say which rank failed and how.

`spawn(fn, 4)` runs `fn(*args)` in 4 fresh processes (multiprocessing 'spawn' context) with the
environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on a free port of 127.0.0.1), initializes the default process group (gloo unless told
otherwise), and returns `[result of rank 0, result of rank 1, ...]`. `fn` must be importable (module
level), results must be picklable; an overall timeout bounds everything. POSIX only (Linux, macOS).

**Failures.** The first rank that fails takes the others down with it, and the parent raises `WorkerError`
naming that rank, how it ended (its traceback, or its exit code or signal when it died without reporting)
and the last lines it printed. "First" is by time, with one rule on top: an error that says a peer or
the link to it went away (gloo's transport errors such as "Connection closed by peer", timeouts included;
torch.distributed's DistError family, e.g. NCCL's DistBackendError) is how a rank fails when another one
vanished, so such a failure is blamed only when no rank failed in another way. Each worker reports through
its own pipe before it exits, so a rank that exited is known to have reported or not; after a link
failure the parent waits up to SETTLE_S for the other ranks to end, so that the cause is seen even when
its consequence arrives first.

**Output.** Each worker's stdout and stderr are a pipe or, where the parent's own stream is a terminal,
a pseudo-terminal of the same size (progress bars, widths and anything else that asks isatty() behave as
before). A thread of the parent passes every byte on to the parent's fd 1 / 2 as it comes and keeps the
last TAIL_BYTES of each rank for the report; it lives in the parent because a dying worker cannot be
trusted to save its own output. Workers print line-buffered, with faulthandler on, so a crash's last words
and its Python stack reach the report.

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
import faulthandler
import fcntl
import os
import pickle
import pty
import selectors
import signal
import socket
import sys
import termios
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import connection, reduction
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Default process-group timeout: long enough for a first step that compiles, short enough that a
#: rank stuck in a collective surfaces as an error instead of a hang.
DEFAULT_PG_TIMEOUT_S = 300.0
#: After a first failure, how long the other ranks get to end (or report) before they are stopped: when
#: only link failures (consequences) came in, long enough for their cause to show; after a cause, a moment
#: to list what followed it. A rank blocked in a collective with a dead peer fails within milliseconds.
SETTLE_S = 2.0
SETTLE_AFTER_CAUSE_S = 0.5
#: Starts on a fresh port when the chosen one was taken before rank 0 could listen on it.
PORT_ATTEMPTS = 3
#: Output kept per rank for the report (stdout and stderr together), and lines of it shown.
TAIL_BYTES = 16384
TAIL_LINES = 20

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


# ------------------------------------------------------------------------------------------- in the worker


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


def _redirect_output(stdout_fd: int, stderr_fd: int) -> None:
    """fd 1 / 2 become the launcher's capture; line-buffered so a dying worker loses nothing it printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, target in ((stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    faulthandler.enable(all_threads=False)  # SIGSEGV, SIGABRT...: the crashing stack goes into the report


def _is_link_failure(error: BaseException) -> bool:
    """Whether the error says a peer or the link to it went away: the consequence of another rank's
    failure more often than a cause. Read from the error itself, not from where it surfaced: a Work's
    wait() raises wherever the caller waits (halfbyte.comm, the engine, user code)."""
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def _worker(rank: int, nprocs: int, port: int, env: dict[str, str], backend: str | None,
            pg_timeout_s: float, parent_pid: int, stdout_fd: int, stderr_fd: int,
            report: connection.Connection, fn: Callable[..., Any], args: tuple) -> None:
    _die_with_parent(parent_pid)
    _redirect_output(stdout_fd, stderr_fd)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Ranks share the host's cores: one rank must not spin threads on all of them. OMP_NUM_THREADS,
    # inherited from the parent or given in env, wins; it is read from os.environ (env holds only the
    # extra variables) and applied here, since torch read its own at import, before env was set.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    elif threads.strip().isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    failed = in_rendezvous = False
    try:
        if backend is not None:
            in_rendezvous = True
            init_process_group_from_env(backend, timeout_s=pg_timeout_s)
            in_rendezvous = False
        # Plain pickle (not torch's shared-memory reducers): the child may exit before the parent
        # reads, and a result is small.
        outcome: tuple = (True, pickle.dumps(fn(*args)))
    except BaseException as e:  # report everything, KeyboardInterrupt included, then exit non-zero
        failed = True
        outcome = (False, traceback.format_exc(), time.time(), _is_link_failure(e), in_rendezvous)
    try:
        report.send_bytes(pickle.dumps(outcome))  # before the process group goes: peers fail after this
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------- in the parent


class _PassedFd:
    """A file descriptor handed to a 'spawn' child with the Process arguments, the way multiprocessing
    hands over a Connection: the child receives its own copy (an int)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _adopt_fd, (reduction.DupFd(self.fd),)


def _adopt_fd(dup: Any) -> int:
    return dup.detach()


def _capture_pair(target: int) -> tuple[int, int]:
    """(parent's read end, worker's write end) for a worker's stdout (target 1) or stderr (2): a
    pseudo-terminal of the parent's size where the parent's own stream is a terminal, else a pipe."""
    if not os.isatty(target):
        return os.pipe()
    reader, writer = pty.openpty()
    mode = termios.tcgetattr(writer)
    mode[1] &= ~termios.OPOST  # bytes pass unchanged; the parent's own terminal translates "\n"
    termios.tcsetattr(writer, termios.TCSANOW, mode)
    fcntl.ioctl(writer, termios.TIOCSWINSZ, fcntl.ioctl(target, termios.TIOCGWINSZ, b"\0" * 8))
    return reader, writer


class _OutputTee:
    """The parent's end of every worker's stdout and stderr: a thread passes each chunk on to the parent's
    fd 1 / 2 as it comes and keeps each rank's last TAIL_BYTES (both streams, in arrival order)."""

    def __init__(self, nprocs: int) -> None:
        self._tails = [bytearray() for _ in range(nprocs)]
        self.worker_ends: dict[int, tuple[int, int]] = {}  # rank: its (stdout, stderr) until it started
        self._readers: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._unforwardable: set[int] = set()
        self._closing = threading.Event()
        for rank in range(nprocs):
            ends = []
            for target in (1, 2):
                reader, writer = _capture_pair(target)
                self._readers.append(reader)
                self._selector.register(reader, selectors.EVENT_READ, (rank, target))
                ends.append(writer)
            self.worker_ends[rank] = (ends[0], ends[1])
        self._thread = threading.Thread(target=self._pump, name="halfbyte-worker-output", daemon=True)
        self._thread.start()

    def started(self, rank: int) -> None:
        """The worker has its own copies: drop ours, so that its death reads as end-of-file here."""
        for fd in self.worker_ends.pop(rank):
            os.close(fd)

    def _pump(self) -> None:
        drain_until = None
        while self._selector.get_map():
            if self._closing.is_set() and drain_until is None:
                drain_until = time.monotonic() + 1.0  # bounded: a worker's orphaned child may go on writing
            events = self._selector.select(timeout=0 if drain_until else 0.1)
            if drain_until is not None and (not events or time.monotonic() > drain_until):
                return
            for key, _ in events:
                rank, target = key.data
                try:
                    data = os.read(key.fd, 65536)
                except OSError:  # EIO: a pseudo-terminal whose writers are all gone
                    data = b""
                if not data:
                    self._selector.unregister(key.fd)
                    continue
                self._forward(target, data)
                tail = self._tails[rank]
                tail += data
                del tail[:-TAIL_BYTES]

    def _forward(self, target: int, data: bytes) -> None:
        if target in self._unforwardable:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(target, view):]
        except OSError:  # the parent's stream is closed or broken (`| head`): keep capturing only
            self._unforwardable.add(target)

    def close(self) -> None:
        """Once the workers are gone: read what is left, stop the thread, close everything."""
        self._closing.set()
        self._thread.join(timeout=5.0)
        self._selector.close()
        for fd in self._readers + [fd for ends in self.worker_ends.values() for fd in ends]:
            os.close(fd)

    def last_lines(self, rank: int) -> list[str]:
        """The last TAIL_LINES non-blank lines rank printed, a progress bar's redraws reduced to the last."""
        tail = self._tails[rank]
        lines = tail.decode("utf-8", "replace").split("\n")
        if len(tail) == TAIL_BYTES:
            lines = lines[1:]  # its first line is cut
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in lines]
        return [line for line in lines if line.strip()][-TAIL_LINES:]

    def describe(self, rank: int) -> str:
        lines = self.last_lines(rank)
        if not lines:
            return f"rank {rank} printed nothing once started (errors while starting up are printed above)"
        return f"last lines of rank {rank} (stdout and stderr):\n" + "\n".join(f"  | {line}" for line in lines)


@dataclass
class _Ending:
    """How a rank ended badly, as the parent learned it."""

    rank: int
    at: float  # time.time(): when it raised (its clock) or when the parent saw it die unreported
    traceback: str | None = None  # None: it died without reporting
    exitcode: int | None = None
    link_failure: bool = False
    in_rendezvous: bool = False  # it failed while spawn initialized its process group, before fn

    def how(self) -> str:
        """How a rank that reported nothing ended."""
        if self.exitcode is not None and self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = str(-self.exitcode)
            return f"died from signal {name} before reporting a result"
        return f"died with exit code {self.exitcode} before reporting a result"


@dataclass
class _Outcome:
    """What the parent saw: every result, or the ranks that failed and those still running."""

    values: dict[int, Any] = field(default_factory=dict)
    endings: dict[int, _Ending] = field(default_factory=dict)

    def culprit(self) -> _Ending:
        """The first failure by time; a link failure only when there is no other."""
        endings = list(self.endings.values())
        causes = [e for e in endings if not e.link_failure] or endings
        return min(causes, key=lambda e: (e.at, e.rank))

    def report(self, nprocs: int, timeout_s: float, tee: _OutputTee) -> str:
        running = [r for r in range(nprocs) if r not in self.values and r not in self.endings]
        if not self.endings:  # nobody failed: the deadline passed
            return "\n".join([f"timed out after {timeout_s:.0f} s waiting for ranks {running}",
                              *(tee.describe(r) for r in running)])
        first = self.culprit()
        if first.traceback is not None:
            lines = [f"rank {first.rank} of {nprocs} failed:", first.traceback.rstrip("\n")]
        else:
            lines = [f"rank {first.rank} of {nprocs} {first.how()}"]
        lines.append(tee.describe(first.rank))
        for e in sorted(self.endings.values(), key=lambda e: (e.at, e.rank)):
            if e is first:
                continue
            if e.traceback is None:
                lines.append(f"then rank {e.rank} {e.how()}")
                continue
            where = f", most likely because rank {first.rank} was gone" if e.link_failure else ""
            lines.append(f"then rank {e.rank} failed too{where}: {e.traceback.rstrip().splitlines()[-1]}")
        if running:
            lines.append(f"ranks {running} were still running and were stopped")
        return "\n".join(lines)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 120.0,
          env: dict[str, str] | None = None, backend: str | None = "gloo",
          pg_timeout_s: float | None = None) -> list[Any]:
    """Run `fn(*args)` on `nprocs` local ranks; return their results in rank order.

    backend: process group the workers get before `fn` runs ("gloo", "nccl"), or None to leave
    initialization to `fn` (call `init_process_group_from_env`). env: extra environment variables.
    Each worker runs OMP_NUM_THREADS torch threads (this process's environment, or env), else
    os.cpu_count() // nprocs.
    pg_timeout_s: process-group timeout (default: min(timeout_s, 300 s)).
    Raises WorkerError naming the first failing rank, or on timeout; every worker is gone by then. The
    workers die with this process if it dies first (on Linux, with the thread that called spawn: it is
    the one that waits here until they are gone).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    pg_timeout = pg_timeout_s if pg_timeout_s is not None else min(timeout_s, DEFAULT_PG_TIMEOUT_S)
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        outcome, tee = _spawn_once(fn, nprocs, args, port, timeout_s, env, backend, pg_timeout)
        # free_port's port can be taken by another process before rank 0 listens on it; the ranks
        # were all still in spawn's rendezvous, none has run fn, so they can start again elsewhere
        if not _port_was_taken(outcome) or attempt == PORT_ATTEMPTS - 1:
            break
        print(f"note: port {port} was taken by another process before rank 0 could listen on it (EADDRINUSE); "
              "starting the ranks again on another port", file=sys.stderr, flush=True)
    if len(outcome.values) < nprocs:
        raise WorkerError(outcome.report(nprocs, timeout_s, tee))
    return [outcome.values[r] for r in range(nprocs)]


def _port_was_taken(outcome: _Outcome) -> bool:
    """Whether a rank failed to listen on the port in spawn's own rendezvous (so no rank ran fn)."""
    return not outcome.values and any(e.in_rendezvous and "EADDRINUSE" in (e.traceback or "")
                                      for e in outcome.endings.values())


def _spawn_once(fn: Callable[..., Any], nprocs: int, args: tuple, port: int, timeout_s: float,
                env: dict[str, str] | None, backend: str | None, pg_timeout: float) -> tuple[_Outcome, _OutputTee]:
    """One start of the ranks on `port`: their outcome, and the tee that holds their last lines."""
    ctx = mp.get_context("spawn")
    tee = _OutputTee(nprocs)
    procs: list[Any] = []
    receivers: list[connection.Connection] = []
    outcome = _Outcome()
    try:
        for rank in range(nprocs):
            receiver, sender = ctx.Pipe(duplex=False)
            out_fd, err_fd = tee.worker_ends[rank]
            p = ctx.Process(target=_worker, daemon=True, name=f"halfbyte-rank{rank}",
                            args=(rank, nprocs, port, dict(env or {}), backend, pg_timeout, os.getpid(),
                                  _PassedFd(out_fd), _PassedFd(err_fd), sender, fn, args))
            p.start()
            tee.started(rank)
            sender.close()
            procs.append(p)
            receivers.append(receiver)
        outcome = _wait(procs, receivers, time.monotonic() + timeout_s)
    finally:
        # all reported: let them tear down their process groups; else stop them now
        _stop(procs, grace_s=10.0 if len(outcome.values) == nprocs else 0.0)
        for receiver in receivers:
            receiver.close()
        tee.close()
    return outcome, tee


def _wait(procs: list, receivers: list[connection.Connection], deadline: float) -> _Outcome:
    """Results and failures as they come, until every rank reported or ended, or a while after a first
    failure (SETTLE_S / SETTLE_AFTER_CAUSE_S), or the deadline."""
    outcome = _Outcome()
    settle_until = float("inf")
    while True:
        open_ranks = [r for r in range(len(procs)) if r not in outcome.values and r not in outcome.endings]
        now = time.monotonic()
        if not open_ranks or now > settle_until or now > deadline:
            return outcome
        ready = connection.wait([receivers[r] for r in open_ranks] + [procs[r].sentinel for r in open_ranks],
                                timeout=min(0.2, max(0.0, min(deadline, settle_until) - now)))
        for r in open_ranks:
            # Whether it ended first, its pipe second: a rank that ended has sent whatever it will send.
            ended = procs[r].sentinel in ready or procs[r].exitcode is not None
            message = None
            if receivers[r].poll():
                try:
                    message = pickle.loads(receivers[r].recv_bytes())
                except EOFError:  # its end closed: it died without a (complete) report
                    ended = True
            if message is not None and message[0]:
                outcome.values[r] = pickle.loads(message[1])
                continue
            if message is not None:
                _, text, at, link_failure, in_rendezvous = message
                outcome.endings[r] = _Ending(r, at, traceback=text, link_failure=link_failure,
                                             in_rendezvous=in_rendezvous)
            elif ended:
                procs[r].join(timeout=1.0)  # the sentinel fires a moment before the exit code is there
                outcome.endings[r] = _Ending(r, time.time(), exitcode=procs[r].exitcode)
            else:
                continue
            settle = SETTLE_S if outcome.endings[r].link_failure else SETTLE_AFTER_CAUSE_S
            settle_until = min(settle_until, time.monotonic() + settle)


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
