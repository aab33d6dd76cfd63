"""Timing hooks in the collectives: where the codec runs and where a caller waits on the wire.

The collectives enter `region("codec", step)` around each codec step (quantize / dequantize and the
wire layout, named in CODEC_STEPS) and `region("wait", "comm")` around the first `CommHandle.wait()`
of each handle. Without an installed timer a region is a shared no-op object (one global read per
step), so the hot path pays nothing. `installed(timer)` routes regions to `timer` while inside.

Why explicit regions and not wrappers patched over `halfbyte.comm.collectives`: a patch only sees the
calls that look the functions up in that module at call time; a caller that imported a step by name
(`from halfbyte.comm import encode_chunks`) would silently escape it, and the codec share of a step
would read low with no error. Here the step itself reports, whoever calls it.

Regions nest (the gloo path decodes inside a wait; `encode_chunks` packs its messages with
`pack_messages`): a timer sees every begin/end pair and decides how to count nesting.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Protocol

Kind = Literal["codec", "wait"]

#: Every codec step the collectives time, in no particular order: the pure functions of
#: `halfbyte.comm.collectives` that turn values into wire bytes or back.
CODEC_STEPS = ("encode_chunks", "encode_two_level", "middle_hop", "decode_sum", "encode_shard",
               "decode_gathered", "pack_messages", "decode_chunks")


class Timer(Protocol):
    """What `installed` accepts: begin returns a token that the matching end receives."""

    def begin(self, kind: Kind, name: str) -> Any: ...

    def end(self, token: Any) -> None: ...


class _NoRegion:
    """The region when no timer is installed: does nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Region:
    __slots__ = ("timer", "kind", "name", "token")

    def __init__(self, timer: Timer, kind: Kind, name: str) -> None:
        self.timer, self.kind, self.name, self.token = timer, kind, name, None

    def __enter__(self) -> None:
        self.token = self.timer.begin(self.kind, self.name)

    def __exit__(self, *exc: object) -> None:
        # the timer that saw begin sees end, even if another was installed in between
        self.timer.end(self.token)


_NO_REGION = _NoRegion()
_timer: Timer | None = None


def region(kind: Kind, name: str) -> _Region | _NoRegion:
    """Context manager around one codec step (kind "codec", name from CODEC_STEPS) or one wait on
    a communication handle (kind "wait"); reported to the installed timer, if any."""
    timer = _timer
    return _NO_REGION if timer is None else _Region(timer, kind, name)


@contextlib.contextmanager
def installed(timer: Timer) -> Iterator[Timer]:
    """Report every region entered inside this block (in this process) to `timer`."""
    global _timer
    previous, _timer = _timer, timer
    try:
        yield timer
    finally:
        _timer = previous
