"""Checks on the paths a command is asked to write to, shared by the commands that write (train's run
directory, prepare-data, export, the benchmarks). Imports nothing heavy: prepare-data runs without torch."""

from __future__ import annotations

from pathlib import Path


def file_in_the_way(path: Path) -> Path | None:
    """The file that stands where `path` needs a directory above it (None: nothing does): creating
    `path` would fail with a bare "File exists" / "Not a directory" that names neither."""
    first = next((p for p in path.parents if p.exists()), None)
    return first if first is not None and not first.is_dir() else None
