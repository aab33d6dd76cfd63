"""Benchmarks (`halfbyte bench kernels|comm|train`) and the cost model (`halfbyte simulate`)."""

from pathlib import Path

#: Where a benchmark writes when --out is not given: runs/bench/ under the current directory (runs/
#: is ignored by git), never over the committed results in benchmarks/results/.
DEFAULT_RESULTS_DIR = Path("runs") / "bench"
