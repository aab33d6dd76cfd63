"""Local updates on CPU (issue 9's study, scaled down): every-step sharded DP vs islands meeting every tau
steps (average, DiLoCo nesterov, sign momentum over fp32 or int4 pseudo-gradients).

    OMP_NUM_THREADS=2 python scripts/local_updates_study.py              # the whole grid, one run at a time
    OMP_NUM_THREADS=2 python scripts/local_updates_study.py --runs sm-int4-t8 --reuse

Every run is `halfbyte train` on the tiny GPT and built-in Shakespeare with 8 virtual ranks in one
process, one rank per emulated node (so every link is the slow, inter-node class) and the same seed,
data, steps and LR schedule. Local-update runs use one island per rank. Steps (512) and the eval
interval (32) are multiples of both tau values, so every validation loss is taken right after an
outer step, on the synchronized model. Writes to OUT (benchmarks/results/local-updates-cpu/):
<run>/metrics.jsonl, summary.json, val_loss.png and README.md (table and exact commands).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# scripts/ is on sys.path when a script runs, so its shared module imports by name
from study_common import plot_val_loss, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "local-updates-cpu"
RUNS_DIR = ROOT / "runs" / "local-updates-cpu"

STEPS, BATCH, SEQ_LEN = 512, 16, 128
COMMON = ["--virtual-ranks", "8", "--virtual-gpus-per-node", "1", "--seed", "0", "--steps", str(STEPS),
          "--batch-size", str(BATCH), "--train.seq_len", str(SEQ_LEN), "--train.eval_interval", "32",
          "--train.checkpoint_interval", "0", "--train.sample_tokens", "0"]
ISLANDS = ["--preset", "baseline", "--islands", "8"]


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    args: tuple[str, ...]


def local(name: str, label: str, outer: str, tau: int, *extra: str) -> Run:
    return Run(name, label, (*ISLANDS, "--outer", outer, "--local-steps", str(tau), *extra))


GRID = [
    Run("dp-baseline", "every-step DP, fp32 (baseline)", ("--preset", "baseline")),
    Run("dp-baseline-seed1", "every-step DP, fp32, seed 1 (noise)", ("--preset", "baseline", "--seed", "1")),
    Run("dp-sdp4bit", "every-step DP, sdp4bit", ("--preset", "sdp4bit")),
    local("avg-t8", "average, tau 8", "average", 8),
    local("nesterov-t8", "DiLoCo nesterov, tau 8", "nesterov", 8),
    local("sm-fp32-t8", "sign-momentum fp32, tau 8", "sign-momentum", 8),
    local("sm-int4-t8", "sign-momentum int4 +EF, tau 8", "sign-momentum", 8, "--outer-bits", "4"),
    local("sm-int4-noef-t8", "sign-momentum int4 no EF, tau 8", "sign-momentum", 8, "--outer-bits", "4",
          "--outer.error_feedback", "false"),
    local("sm-int4-t32", "sign-momentum int4 +EF, tau 32", "sign-momentum", 32, "--outer-bits", "4"),
    # outer lr sweep (the default, 1 x inner lr, moves each coordinate by one inner step per round)
    *(local(f"sm-int4-t8-lr{lr}", f"sign-momentum int4 +EF, tau 8, outer lr {lr}", "sign-momentum", 8,
            "--outer-bits", "4", "--outer-lr", str(lr)) for lr in (0.5, 2, 4)),
    # 2 islands of 4 ranks (one node each, every-step fp32 DP inside): 4x larger inner batches
    Run("sm-int4-t8-2islands", "sign-momentum int4 +EF, tau 8, 2 islands x 4 ranks",
        ("--preset", "baseline", "--virtual-gpus-per-node", "4", "--islands", "2", "--outer", "sign-momentum",
         "--local-steps", "8", "--outer-bits", "4")),
]


def command(run: Run) -> list[str]:
    out = (RUNS_DIR / run.name).relative_to(ROOT)  # commands run in the repository root
    return ["halfbyte", "train", *COMMON, *run.args, "--train.name", run.name, "--out", str(out)]


def finished(run: Run) -> bool:
    metrics = RUNS_DIR / run.name / "metrics.jsonl"
    return metrics.is_file() and any(r["step"] == STEPS and "val_loss" in r for r in read_jsonl(metrics))


def train(run: Run) -> float:
    """Run one training job; returns its wall time in seconds."""
    cmd = command(run)
    print(f"== {run.name}: {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    print("\n".join(line for line in done.stdout.splitlines() if "step/s" not in line), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{run.name} failed with exit code {done.returncode}")
    return wall


def summarize(run: Run, wall_s: float | None) -> dict:
    records = read_jsonl(OUT / run.name / "metrics.jsonl")
    last = records[-1]
    tokens = last["step"] * BATCH * SEQ_LEN
    island = last.get("wire_island_bytes", 0)
    # One rank per emulated node: inter-node links are the links between islands (every-step DP
    # included, where each rank stands for one island); bytes are summed over all 8 ranks.
    inter, intra = last["wire_inter_bytes"] + island, last["wire_intra_bytes"]
    return {"name": run.name, "label": run.label, "command": shlex.join(command(run)),
            "steps": last["step"], "train_loss_last10": last["loss"], "val_loss": last["val_loss"],
            "inter_bytes": inter, "intra_bytes": intra,
            "inter_bytes_per_token": inter / tokens, "intra_bytes_per_token": intra / tokens,
            "outer_steps": last.get("outer_steps", 0), "train_elapsed_s": last["elapsed_s"], "wall_s": wall_s,
            "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]}


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["name"] == "dp-baseline")
    lines = [("| run | train loss | val loss | val gap vs baseline | inter B/token | intra B/token | "
              "inter bytes vs baseline | outer steps | train time | wall |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gap = (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        fewer = base["inter_bytes"] / r["inter_bytes"]
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "n/a"
        lines.append(f"| `{r['name']}` {r['label']} | {r['train_loss_last10']:.4f} | {r['val_loss']:.4f} | "
                     f"{gap:+.2%} | {r['inter_bytes_per_token']:,.0f} | {r['intra_bytes_per_token']:,.0f} | "
                     f"{fewer:,.1f}x fewer | {r['outer_steps']} | {r['train_elapsed_s']:.0f} s | {wall} |")
    return "\n".join(lines)


def readme(rows: list[dict]) -> str:
    commands = "\n".join(f"OMP_NUM_THREADS=2 {r['command']}" for r in rows)
    return f"""# Local updates on CPU: sign momentum over 4-bit pseudo-gradients vs DiLoCo vs every-step DP

Made by `OMP_NUM_THREADS=2 python scripts/local_updates_study.py` (reading: docs/local_updates.md,
"Measured on CPU"). Tiny GPT (1.31M parameters), built-in Shakespeare, 8 virtual ranks in one
process, one rank per emulated node, global batch {BATCH} x {SEQ_LEN} tokens, {STEPS} steps, default
AdamW and cosine LR schedule (peak 4e-3), seed 0 for every run (`dp-baseline-seed1`: the baseline with
seed 1, a run-to-run noise reference). Local-update runs: 8 islands of one rank (inner preset
baseline, fp32), outer optimizer defaults unless the name says otherwise.

- train loss: mean over the last 10 steps; val loss: the final validation loss (16,384 tokens), taken
  right after an outer step (512 and the eval interval 32 are multiples of every tau).
- inter / intra B/token: bytes sent over inter-node (= inter-island) and intra-node links, summed over
  the 8 ranks, per training token; "inter bytes vs baseline": every-step fp32 DP's inter bytes over
  this run's.
- train time: the training loop's own clock (evaluation included); wall: the whole `halfbyte train`
  process (n/a: not recorded). Both on 2 cores shared with other jobs, which slowed some runs
  several-fold (dp-baseline-seed1, dp-sdp4bit, sm-int4-noef-t8): they say nothing about speed.

{table(rows)}

Curves: `val_loss.png`; per-run logs: `<run>/metrics.jsonl`; numbers: `summary.json`.

Commands (run dirs under runs/local-updates-cpu/):

```
{commands}
```
"""


def report(walls: dict[str, float | None], summary_path: Path) -> None:
    rows = [summarize(run, walls.get(run.name)) for run in GRID if (OUT / run.name / "metrics.jsonl").is_file()]
    summary_path.write_text(json.dumps({"steps": STEPS, "batch": BATCH, "seq_len": SEQ_LEN, "common_args": COMMON,
                                        "python": sys.version.split()[0], "runs": rows}, indent=1))
    plot_val_loss(rows, OUT / "val_loss.png", "validation loss (8 ranks, tiny GPT, Shakespeare, CPU)")
    (OUT / "README.md").write_text(readme(rows))
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", help="run these names only (default: all); the report covers every "
                        "run with results in OUT")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose run dir already finished")
    parser.add_argument("--list", action="store_true", help="print the run names and commands, run nothing")
    args = parser.parse_args()
    if args.list:
        for run in GRID:
            print(f"{run.name}: {shlex.join(command(run))}")
        return
    unknown = set(args.runs or []) - {run.name for run in GRID}
    if unknown:
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; known: {[run.name for run in GRID]}")

    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    old = {r["name"]: r for r in json.loads(summary_path.read_text())["runs"]} if summary_path.is_file() else {}
    walls = {name: r["wall_s"] for name, r in old.items()}
    for run in GRID:
        if args.runs and run.name not in args.runs:
            continue
        if not (args.reuse and finished(run)):
            walls[run.name] = train(run)
        (OUT / run.name).mkdir(exist_ok=True)
        shutil.copyfile(RUNS_DIR / run.name / "metrics.jsonl", OUT / run.name / "metrics.jsonl")
        report(walls, summary_path)  # after every run, so an interrupted grid keeps what it measured


if __name__ == "__main__":
    main()
