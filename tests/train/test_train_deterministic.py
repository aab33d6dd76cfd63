"""--train.deterministic: the switch sets torch's and cuBLAS's deterministic modes, a run trains with
it (no op of the GPT lacks a deterministic kernel), and two runs of one command retrace each other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=8",
         "--lr=1e-2", "--warmup_steps=2", "--min_lr=1e-3", "--eval_tokens=512", "--log_interval=1",
         "--sample_tokens=0", "--steps=6", "--eval_interval=3", "--virtual-ranks=4",
         "--virtual-gpus-per-node=2", "--preset=sdp4bit"]


def _losses(out: Path, *args: str) -> list[tuple[int, float, float | None]]:
    run = subprocess.run([sys.executable, "-m", "halfbyte", "train", *SMALL, *args, f"--out={out}"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


@pytest.mark.timeout(300)
def test_two_deterministic_runs_are_equal(tmp_path):
    first = _losses(tmp_path / "a", "--train.deterministic=true")
    assert [s for s, _, _ in first] == list(range(1, 7))
    assert first == _losses(tmp_path / "b", "--train.deterministic=true")


def test_the_switch_sets_torch_and_cublas():
    code = ("import os, torch; from halfbyte.train.loop import use_deterministic_kernels; "
            "assert not torch.are_deterministic_algorithms_enabled(); use_deterministic_kernels(); "
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'], "
            "torch.backends.cudnn.benchmark)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", ":4096:8", "False"]
