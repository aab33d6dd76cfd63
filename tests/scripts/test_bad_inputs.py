"""scripts/bad_inputs.py: its --help answers without running a single case."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bad_inputs.py"


def test_help_prints_the_docstring_and_runs_nothing():
    before = set(Path(tempfile.gettempdir()).glob("halfbyte-bad-inputs-*"))
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "docs/errors.md" in res.stdout
    assert set(Path(tempfile.gettempdir()).glob("halfbyte-bad-inputs-*")) == before  # no small run was started
    bad = subprocess.run([sys.executable, str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
