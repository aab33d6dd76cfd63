"""The launcher returns results in rank order and turns any failing, dying or hanging rank into a
prompt WorkerError in the parent that names the rank that failed first, how it ended and what it printed
last; worker output still reaches the launcher's own stdout / stderr (a terminal stays a terminal)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from halfbyte.comm import WorkerError, spawn
from halfbyte.comm.launch import _Ending, _is_link_failure, _Outcome


def _report(offset: int) -> tuple:
    print(f"out of rank {dist.get_rank()}", flush=True)
    print(f"err of rank {dist.get_rank()}", file=sys.stderr, flush=True)
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return (dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), os.environ["HALFBYTE_X"], t.item(),
            os.isatty(1) or os.isatty(2))


def _fail_or_hang(mode: str) -> None:
    rank = int(os.environ["RANK"])  # "hang" runs without a process group
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("boom from the worker")
        if mode == "die":
            os._exit(7)
    if mode == "hang":
        print(f"rank {rank} waits forever", flush=True)
    if mode == "hang" or rank == 0:
        time.sleep(600)  # rank 0 waits forever: the launcher must not


@pytest.mark.timeout(60)
def test_results_in_rank_order_with_env_and_output_on_the_launchers_streams(capfd):
    results = spawn(_report, 2, 10, env={"HALFBYTE_X": "y"}, timeout_s=50)
    assert results == [(0, 2, 0, "y", 21.0, False), (1, 2, 1, "y", 21.0, False)]  # no terminal: pipes
    out, err = capfd.readouterr()
    for rank in range(2):
        assert f"out of rank {rank}" in out and f"err of rank {rank}" in err
        assert f"err of rank {rank}" not in out and f"out of rank {rank}" not in err


@pytest.mark.timeout(90)
def test_a_port_taken_before_the_workers_listen_is_replaced(monkeypatch):
    # free_port's port can be taken by another process before rank 0 listens on it (seen with tests
    # in parallel on a GPU host: EADDRINUSE); nothing has run then, so spawn tries another port
    import halfbyte.comm.launch as launch

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real_free_port = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: ports.pop() if ports else real_free_port())
    try:
        assert spawn(_report, 2, 10, env={"HALFBYTE_X": "y"}, timeout_s=60)[0][4] == 21.0
    finally:
        taken.close()
    assert not ports  # the taken port was tried first


def _address_in_use_inside_fn(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{dist.get_rank()}\n")
    raise OSError("EADDRINUSE: address already in use (a server of the function's own)")


@pytest.mark.timeout(60)
def test_an_address_in_use_inside_fn_is_not_a_reason_to_run_it_again(tmp_path):
    log = tmp_path / "calls"
    with pytest.raises(WorkerError, match="EADDRINUSE"):
        spawn(_address_in_use_inside_fn, 2, str(log), timeout_s=50)
    assert sorted(log.read_text().split()) == ["0", "1"]  # fn ran once on each rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode, message", [("raise", r"rank 1 of 2 failed:(.|\n)*boom from the worker"),
                                           ("die", "rank 1 of 2 died with exit code 7 before reporting a result")])
def test_failing_rank_is_named_and_others_stopped(mode, message):
    start = time.monotonic()
    with pytest.raises(WorkerError, match=message):
        spawn(_fail_or_hang, 2, mode, timeout_s=50)
    assert time.monotonic() - start < 40


@pytest.mark.timeout(60)
def test_timeout_never_hangs():
    start = time.monotonic()
    # 20 s: long enough for both ranks to start and print on a loaded host (at 8 s a GPU host busy
    # with other work timed out before they printed), short enough to show that nothing hangs
    with pytest.raises(WorkerError, match=r"timed out after 20 s waiting for ranks \[0, 1\]") as info:
        spawn(_fail_or_hang, 2, "hang", timeout_s=20, backend="gloo")  # NCCL on a 1-GPU host fails, not hangs
    assert "  | rank 0 waits forever" in str(info.value) and "  | rank 1 waits forever" in str(info.value)
    assert time.monotonic() - start < 45


def _crash_while_rank0_waits(mode: str) -> None:
    """Rank 1 prints, then fails `mode` way while rank 0 waits for it in an all_reduce: rank 0 then fails too
    ("Connection closed by peer"), later, and that consequence must not be what the report blames."""
    if dist.get_rank() == 1:
        print("rank 1 says: about to fail", flush=True)
        print("rank 1 warns: last words", file=sys.stderr, flush=True)
        time.sleep(0.5)  # rank 0 is blocked in the all_reduce by now
        if mode == "raise":
            raise RuntimeError("boom from rank 1")
        if mode == "exit":
            os._exit(3)
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "sigsegv":
            ctypes.string_at(0)  # reads address 0
    dist.all_reduce(torch.ones(1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode, headline", [
    ("raise", "rank 1 of 2 failed:"),
    ("exit", "rank 1 of 2 died with exit code 3 before reporting a result"),
    ("sigkill", "rank 1 of 2 died from signal SIGKILL before reporting a result"),
    ("sigsegv", "rank 1 of 2 died from signal SIGSEGV before reporting a result"),
])
def test_crash_report_names_the_rank_that_died_and_its_last_lines(mode, headline):
    with pytest.raises(WorkerError) as info:
        spawn(_crash_while_rank0_waits, 2, mode, timeout_s=50)
    report = str(info.value)
    assert report.splitlines()[0] == headline, report
    last_lines = report[report.index("last lines of rank 1"):]
    assert "rank 1 says: about to fail" in last_lines and "rank 1 warns: last words" in last_lines, report
    if mode == "raise":
        assert "RuntimeError: boom from rank 1" in report
    if mode == "sigsegv":  # faulthandler's Python stack of the crash is among the last lines
        assert "Segmentation fault" in last_lines and "_crash_while_rank0_waits" in last_lines, report


def _talk() -> tuple[bool, bool, int]:
    print(f"tty out of rank {dist.get_rank()}", flush=True)
    print(f"tty err of rank {dist.get_rank()}", file=sys.stderr, flush=True)
    return os.isatty(1), os.isatty(2), os.get_terminal_size(1).columns


@pytest.mark.timeout(60)
def test_workers_see_a_terminal_when_the_launcher_has_one():
    """Progress bars and terminal widths keep working: a launcher on a terminal gives its workers one of
    the same size."""
    main, term = pty.openpty()
    os.set_blocking(main, False)
    fcntl.ioctl(term, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from halfbyte.comm import spawn
        import test_comm_launch as t
        print("results", spawn(t._talk, 2, timeout_s=50), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=term, stderr=term, close_fds=True)
    os.close(term)
    seen, deadline = b"", time.monotonic() + 50
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except BlockingIOError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
            continue
        except OSError:  # EIO: every writer of the terminal is gone
            break
        seen += chunk
    proc.wait(timeout=10)
    os.close(main)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "results [(True, True, 123), (True, True, 123)]" in text, text
    for rank in range(2):
        assert f"tty out of rank {rank}" in text and f"tty err of rank {rank}" in text


def _classify_a_broken_link() -> tuple[bool, bool]:
    """Rank 1 tears its process group down while rank 0 waits in an async all_reduce (the way the engine
    and halfbyte.comm wait): how rank 0's real gloo error is read, next to an ordinary error's."""
    if dist.get_rank() == 1:
        time.sleep(0.5)
        dist.destroy_process_group()
        return True, False
    try:
        dist.all_reduce(torch.ones(1), async_op=True).wait()
    except RuntimeError as e:
        return _is_link_failure(e), _is_link_failure(RuntimeError("boom"))
    raise AssertionError("the all_reduce succeeded without its peer")


@pytest.mark.timeout(60)
def test_a_broken_link_reads_as_a_consequence_wherever_it_is_waited_for():
    assert spawn(_classify_a_broken_link, 2, timeout_s=50) == [(True, False)] * 2


def test_blame_goes_to_the_cause_even_when_its_consequence_came_first():
    """The parent may see rank 0's "Connection closed" report before it sees rank 1 die (a busy host):
    the link failure still does not take the blame, unless nothing else failed."""
    link = _Ending(0, at=100.0, traceback="RuntimeError: [gloo/transport/tcp/pair.cc] Connection closed by peer",
                   link_failure=True)
    death = _Ending(1, at=100.5, exitcode=-9)
    assert _Outcome(endings={0: link, 1: death}).culprit() is death
    assert _Outcome(endings={0: link}).culprit() is link
    error = _Ending(1, at=100.7, traceback="RuntimeError: boom")
    assert _Outcome(endings={0: link, 1: error, 2: _Ending(2, at=100.6, exitcode=3)}).culprit().rank == 2
