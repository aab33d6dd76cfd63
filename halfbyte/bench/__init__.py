"""Benchmarks (`halfbyte bench kernels|comm|train`) and the cost model (`halfbyte simulate`)."""

from collections.abc import Iterable
from pathlib import Path

from halfbyte.train.paths import file_in_the_way

#: Where a benchmark writes when --out is not given: runs/bench/ under the current directory (runs/
#: is ignored by git), never over the committed results in benchmarks/results/.
DEFAULT_RESULTS_DIR = Path("runs") / "bench"


def out_problem(path: Path | None, flag: str = "--out", example: str = "results.json") -> str | None:
    """Why a benchmark could not write its results to `path` (None: it can, or no path was given):
    checked before the benchmark runs, which would otherwise fail at its end."""
    if path is None:
        return None
    if path.is_dir():
        return f"{flag} {path} is a directory; name the file, e.g. {flag} {path / example}"
    if (blocker := file_in_the_way(path)) is not None:
        return f"{flag} {path}: {blocker} is a file, not a directory"
    return None


def out_problems(checks: Iterable[tuple[Path | None, str, str]]) -> str | None:
    """Every (path, flag, example) output that out_problem refuses, in one line (None: all can be
    written), so that a user who got two wrong learns both at once."""
    found = [p for path, flag, example in checks if (p := out_problem(path, flag, example))]
    return "; ".join(found) or None
