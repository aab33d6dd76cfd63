"""The README's "Bringing your own model" snippet runs as written: the test takes the section's python
block from README.md and executes it on 2 spawned gloo ranks, with a small model (Linear layers,
LayerNorm, biases), two micro-batches per step, a loss and a working directory given to it, so that
the README cannot rot."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from halfbyte.comm import spawn

import test_readme as workers  # this file, importable by name in the spawned ranks
from toys import mse, regression_batch

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Bringing your own model"
STEPS, MICRO = 3, 2


def snippet() -> str:
    """The first python block after the section's heading."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.DOTALL)
    assert block, f"README.md's {SECTION!r} has no python block"
    return block.group(1)


def readme_worker(code: str, workdir: str) -> dict:
    """The snippet on this rank: `model`, `batches` and `loss_fn` are what it expects to find."""
    rank = torch.distributed.get_rank()
    os.chdir(workdir)  # its checkpoint and safetensors paths are relative: one directory for all ranks
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
    batches = [[regression_batch(step, rank, micro) for micro in range(MICRO)] for step in range(STEPS)]
    scope = {"model": model, "batches": batches, "loss_fn": mse}
    exec(compile(code, str(README), "exec"), scope)
    engine = scope["engine"]
    return {"step_count": engine.step_count, "extra_step": scope["extra"]["step"],
            "weight_decay": [g["weight_decay"] for g in engine.param_groups],
            "group_sizes": [len(g["params"]) for g in engine.param_groups],
            "lr": engine.param_groups[0]["lr"], "skipped": scope["result"].skipped,
            "grad_norm": float(scope["grad_norm"]), "weights": sorted(scope["weights"])}


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="the snippet saves safetensors")
def test_the_readme_snippet_runs_on_two_gloo_ranks(tmp_path):
    results = spawn(workers.readme_worker, 2, snippet(), str(tmp_path), timeout_s=100)
    assert results[0] == results[1]
    r = results[0]
    assert r["step_count"] == r["extra_step"] + 1 == STEPS and not r["skipped"] and r["grad_norm"] > 0
    assert r["weight_decay"] == [0.1, 0.0] and r["group_sizes"] == [2, 4]  # matrices | biases and the norm
    assert r["lr"] == pytest.approx(3e-4 * (STEPS + 1) / 100)  # LambdaLR after STEPS steps, as loaded
    assert r["weights"] == ["0.bias", "0.weight", "1.bias", "1.weight", "3.bias", "3.weight"]
    assert (tmp_path / "ckpt" / "COMPLETE").is_file() and (tmp_path / "model.safetensors").is_file()
