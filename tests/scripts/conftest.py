"""What the study scripts' tests share: scripts/ on sys.path (the scripts and study_common import by
name, as when a script runs), the scripts' command line, a token file for `run`, and the fake trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
FAKE = Path(__file__).with_name("fake_train.py")


@pytest.fixture
def study(request):
    """`study(verb, *options, env=..., timeout=...)`: the test module's SCRIPT run from the checkout."""
    script = request.module.SCRIPT

    def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                              check=False, env={**os.environ, **(env or {})}, timeout=timeout)

    return run


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    """--runs-dir and --done-in inside the test's directory (never the checkout's runs/)."""
    return ["--runs-dir", str(tmp_path), "--done-in", str(tmp_path / "done")]


@pytest.fixture
def fake_train() -> str:
    """--train-cmd for fake_train.py, the fast stand-in for `halfbyte train`."""
    return f"{sys.executable} {FAKE}"


@pytest.fixture
def options():
    """`options(argv)`: the --key value pairs of a train command (after `... -m halfbyte train`)."""
    def parse(argv: list[str]) -> dict[str, str]:
        rest = argv[argv.index("train") + 1:]
        assert len(rest) % 2 == 0 and all(k.startswith("--") for k in rest[::2])
        return dict(zip(rest[::2], rest[1::2]))

    return parse


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A token file with a validation twin just large enough for the design's evaluation set."""
    from convergence_study import EVAL_TOKENS
    from halfbyte.train.data import TokenWriter, val_path_for

    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    rng = np.random.default_rng(0)
    for target, count in ((path, 50_000), (val_path_for(path), EVAL_TOKENS + 1)):
        writer = TokenWriter(target, 4096)
        writer.write(rng.integers(0, 4096, count))
        writer.close()
    return path
