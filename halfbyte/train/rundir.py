"""A run's output directory: nothing in it is ever deleted implicitly.

A new run refuses a directory that holds another run. `--overwrite` (and `--resume auto` where no
checkpoint exists yet) moves the earlier run aside into `.previous-run/`, and deletes it only once
the new run has published its first checkpoint; a run that ends before that puts it back. These
functions run on the leader only (the launching process, or rank 0 under torchrun).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from halfbyte.engine import checkpoint
from halfbyte.train.paths import file_in_the_way

RUN_ENTRIES = ("config.json", "metrics.jsonl", "loss.png", "sample.txt", "checkpoints", "tensorboard")
PREVIOUS = ".previous-run"


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message says why and what to do."""


def holds_run(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in RUN_ENTRIES)


def describe(out_dir: Path) -> str:
    """What the run in out_dir got to, for messages: its newest checkpoint, or its last logged step."""
    found = checkpoint.complete_checkpoints(out_dir / "checkpoints")
    if found:
        return f"{len(found)} checkpoint(s), the newest {found[-1].name}"
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
        try:
            return f"no checkpoint, metrics up to step {json.loads(lines[-1])['step']}" if lines else "no checkpoint"
        except (ValueError, KeyError, TypeError):
            return "no checkpoint"
    return "no checkpoint"


def prepare(out_dir: Path, *, fresh_start: bool, overwrite: bool) -> Path | None:
    """Check out_dir and make it ready; return where an earlier run was moved aside (or None).

    fresh_start: the run starts at step 0 (no checkpoint is resumed). Refuses (RunDirError) a
    directory passed as a file, an unwritable one, one left by an interrupted --overwrite, and a
    fresh start into a directory that holds a run unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"--out {out_dir} is a file; pass a directory (it is created if missing)")
    if (blocker := file_in_the_way(out_dir)) is not None:
        raise RunDirError(f"--out {out_dir}: {blocker} is a file, not a directory; choose another --out")
    previous = out_dir / PREVIOUS
    if previous.exists():
        raise RunDirError(f"{out_dir} holds an earlier run moved aside by an --overwrite that did not finish: "
                          f"it is in {previous}; move its contents back into {out_dir}, or delete {previous}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"--out {out_dir} is not writable ({e.strerror or type(e).__name__}); "
                          "choose another --out") from None
    if not fresh_start or not holds_run(out_dir):
        return None
    if not overwrite:
        raise RunDirError(f"--out {out_dir} holds an earlier run ({describe(out_dir)}): continue it with "
                          "--resume auto, choose another --out, or start anew with --overwrite (the earlier "
                          "run is deleted only once the new run's first checkpoint is saved)")
    previous.mkdir()
    for name in RUN_ENTRIES:
        if (out_dir / name).exists():
            (out_dir / name).rename(previous / name)
    return previous


def discard_previous(out_dir: Path) -> None:
    """The new run is safe (its first checkpoint is published): delete the earlier one."""
    shutil.rmtree(out_dir / PREVIOUS, ignore_errors=True)


def restore_previous(out_dir: Path) -> None:
    """The new run ended before its first checkpoint: remove what it wrote, put the earlier run back."""
    previous = out_dir / PREVIOUS
    if not previous.is_dir():
        return
    for name in RUN_ENTRIES:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (previous / name).exists():
            (previous / name).rename(target)
    shutil.rmtree(previous, ignore_errors=True)
