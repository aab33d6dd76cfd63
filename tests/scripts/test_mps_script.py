"""scripts/mps.sh: without NVIDIA's MPS control binary it leaves MPS off and says so; bad use exits 2."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mps.sh"


def _bash(line: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvidia-cuda-mps-control on it
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=60)


def test_start_without_mps_leaves_it_off_and_the_environment_clean():
    run = _bash(f'source {SCRIPT} start; echo "after: $MPS ${{CUDA_MPS_PIPE_DIRECTORY:-unset}}"')
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["MPS=off", "after: off unset"]


def test_stop_after_off_start_is_a_no_op():
    run = _bash(f'source {SCRIPT} start >/dev/null; source {SCRIPT} stop; echo "rc=$? $MPS"')
    assert run.stdout.strip() == "rc=0 off"


def test_an_unknown_action_exits_2_with_usage():
    run = _bash(f"bash {SCRIPT} restart")
    assert run.returncode == 2
    assert "usage: source scripts/mps.sh start|stop" in run.stderr
