"""scripts/bench_adamw.py (fused vs foreach AdamW through the engine) runs and reports both settings."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_adamw.py"


def test_bench_adamw_times_both_settings_and_names_its_device(tmp_path):
    out = tmp_path / "adamw.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--models", "tiny", "--steps", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and "bench_adamw.py" in result["command"]
    assert [(r["model"], r["fused"]) for r in result["rows"]] == [("tiny", False), ("tiny", True)]
    assert all(0 < r["min_ms"] <= r["median_step_ms"] <= r["max_ms"] for r in result["rows"])
    assert "fused / foreach = " in res.stdout


def test_bench_adamw_without_a_gpu_says_so():
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True,
                         timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no CUDA GPU" in res.stderr
