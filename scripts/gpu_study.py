"""The 125M studies on one GPU with virtual ranks: convergence per communication mode (issue 7) and
local updates across islands (issue 9). Every run is `halfbyte train` on the same corpus, tokens, seed and
LR schedule; they run side by side on one GPU (each alone leaves the GPU idle between its small kernels).

On the GPU machine (see docs/gpu_runbook.md for the whole call):

    python scripts/gpu_study.py prepare --data /tmp/py.bin            # the corpus: installed *.py files
    python scripts/gpu_study.py probe --runs w8-baseline,w8-sdp4bit --budget-s 300 --data /tmp/py.bin
    python scripts/gpu_study.py run --runs w8-baseline,w8-sdp4bit --steps 384 --data /tmp/py.bin \\
        --runs-dir /tmp/runs --deadline-s 420

Here, with the run directories copied back (writes benchmarks/results/gpu-study-125m/):

    python scripts/gpu_study.py report --runs-dir runs/gpu-study --steps 384 --corpus-json runs/gpu-study/corpus.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# scripts/ is on sys.path when a script runs, so its shared module imports by name
from study_common import plot_val_loss, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BATCH, SEQ_LEN, EVAL_EVERY = 64, 512, 32  # 32 Ki tokens per step; eval every 32 steps (a multiple of every tau)


@dataclass(frozen=True)
class Run:
    name: str
    study: str  # "convergence" | "local-updates"
    label: str
    args: tuple[str, ...]


def _every_step(ranks: int, per_node: int, preset: str) -> Run:
    micro = BATCH // ranks
    return Run(f"w{ranks}-{preset}", "convergence", f"{preset}, W={ranks} ({ranks // per_node}x{per_node})",
               ("--virtual-ranks", str(ranks), "--virtual-gpus-per-node", str(per_node),
                "--micro_batch_size", str(micro), "--preset", preset))


def _local(name: str, label: str, outer: str, tau: int, *extra: str) -> Run:
    # 8 islands of one rank each (one rank per emulated node): every byte between ranks crosses islands.
    return Run(name, "local-updates", label,
               ("--virtual-ranks", "8", "--virtual-gpus-per-node", "1", "--micro_batch_size", str(BATCH // 8),
                "--preset", "baseline", "--islands", "8", "--outer", outer, "--local-steps", str(tau), *extra))


GRID = [
    *(_every_step(8, 4, p) for p in ("baseline", "sdp4bit", "zeropp", "qw4", "qwd", "tlq", "tlq-hs")),
    Run("w8-baseline-seed1", "convergence", "baseline, W=8 (2x4), seed 1: run-to-run noise",
        (*_every_step(8, 4, "baseline").args, "--seed", "1")),
    *(_every_step(32, 8, p) for p in ("baseline", "sdp4bit")),
    *(_local(f"sm-int4-t{tau}", f"sign-momentum, int4 pseudo-gradients + EF, tau {tau}", "sign-momentum", tau,
             "--outer-bits", "4") for tau in (8, 32)),
    _local("sm-fp32-t32", "sign-momentum, fp32 pseudo-gradients, tau 32", "sign-momentum", 32),
    _local("nesterov-t32", "DiLoCo (nesterov), fp32, tau 32", "nesterov", 32),
]
BY_NAME = {run.name: run for run in GRID}


def common_args(data: str, steps: int) -> list[str]:
    return ["--config", "configs/gpt-125m.toml", "--data", data, "--seed", "0", "--steps", str(steps),
            "--batch-size", str(BATCH), "--train.seq_len", str(SEQ_LEN), "--lr", "1e-3", "--min_lr", "1e-4",
            "--warmup_steps", str(max(steps // 16, 1)), "--train.eval_interval", str(EVAL_EVERY),
            "--train.eval_tokens", str(4 * BATCH * SEQ_LEN), "--train.log_interval", "8", "--train.checkpoint_interval", "0",
            "--train.check_replicas_interval", "0", "--train.sample_tokens", "0"]


def command(run: Run, data: str, steps: int, runs_dir: Path) -> list[str]:
    return [sys.executable, "-m", "halfbyte", "train", *common_args(data, steps), *run.args,
            "--train.name", run.name, "--out", str(runs_dir / run.name)]


def _select(names: str) -> list[Run]:
    runs = [BY_NAME.get(n) for n in names.split(",")]
    unknown = [n for n, r in zip(names.split(","), runs) if r is None]
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; known: {list(BY_NAME)}")
    return runs


# ------------------------------------------------------------------------------------------ on the GPU


PACKAGES = ("torch", "transformers", "jax", "scipy", "sympy", "sklearn", "pandas", "numpy", "matplotlib")


def prepare(args: argparse.Namespace) -> None:
    """Tokenize the Python source of large installed packages (GPT-2 BPE) into args.data."""
    dirs = sorted({str(Path(root) / pkg) for root in site.getsitepackages() for pkg in PACKAGES
                   if (Path(root) / pkg).is_dir()})
    cmd = [sys.executable, "-m", "halfbyte", "prepare-data", *dirs, "--glob", "*.py", "--tokenizer", "gpt2",
           "--val-fraction", "0.005", "--out", args.data]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def launch(runs: list[Run], data: str, steps: int, runs_dir: Path, deadline_s: float) -> dict[str, int]:
    """Start every run at once, wait for all (killing what outlives deadline_s); exit code per run."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for run in runs:
        cmd = command(run, data, steps, runs_dir)
        (runs_dir / f"{run.name}.cmd").write_text(shlex.join(cmd) + "\n")
        with open(runs_dir / f"{run.name}.log", "w") as log:  # the child keeps its own copy of the handle
            procs[run.name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs.values()) and time.monotonic() - t0 < deadline_s:
        time.sleep(2)
    for name, p in procs.items():
        if p.poll() is None:
            print(f"{name}: still running after {deadline_s:.0f} s, killed", flush=True)
            p.kill()
            p.wait()
    codes = {name: p.returncode for name, p in procs.items()}
    print(f"{len(runs)} runs, {time.monotonic() - t0:.0f} s, exit codes {codes}", flush=True)
    for name, code in codes.items():
        if code:
            tail = (runs_dir / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
            print(f"--- {name} (exit {code}), end of its log:", *tail, sep="\n", flush=True)
    return codes


PROBE_STEPS, STARTUP_S = 24, 45  # STARTUP_S: process start, model build and the final eval, per run


def probe(args: argparse.Namespace) -> None:
    """Time PROBE_STEPS steps of the runs side by side; print the step count that fills --budget-s."""
    runs_dir = Path(args.runs_dir) / "probe"
    if any(launch(_select(args.runs), args.data, PROBE_STEPS, runs_dir, deadline_s=240).values()):
        raise SystemExit("probe: a run failed")
    per_step = []
    for run in _select(args.runs):
        recs = {r["step"]: r for r in read_jsonl(runs_dir / run.name / "metrics.jsonl")}
        per_step.append((recs[PROBE_STEPS]["elapsed_s"] - recs[8]["elapsed_s"]) / (PROBE_STEPS - 8))
    # The slowest run sets the pace; 15% for evaluations (every 32 steps) and uneven sharing of the GPU.
    steps = int((args.budget_s - STARTUP_S) / (max(per_step) * 1.15) // EVAL_EVERY * EVAL_EVERY)
    print(json.dumps({"step_s_side_by_side": per_step, "steps_for_budget": steps}), flush=True)


def run(args: argparse.Namespace) -> None:
    codes = launch(_select(args.runs), args.data, args.steps, Path(args.runs_dir), args.deadline_s)
    if any(codes.values()):
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------------ here


def summarize(run: Run, runs_dir: Path, steps: int) -> dict | None:
    path = runs_dir / run.name / "metrics.jsonl"
    if not path.is_file():
        return None
    records = read_jsonl(path)
    last = records[-1]
    cmd_file = runs_dir / f"{run.name}.cmd"
    tokens = last["step"] * BATCH * SEQ_LEN
    # Bytes summed over all ranks, per training token. In the local-update layout (8 islands of one
    # rank) every link is between islands; for every-step runs, "all links" is what would cross islands
    # if each rank were its own island.
    inter, intra, island = last["wire_inter_bytes"], last["wire_intra_bytes"], last.get("wire_island_bytes", 0)
    return {"name": run.name, "study": run.study, "label": run.label, "finished": last["step"] == steps,
            "command": cmd_file.read_text().strip() if cmd_file.is_file() else None,
            "steps": last["step"], "train_loss": last["loss"],
            "inter_bytes_per_token": (inter + island) / tokens, "intra_bytes_per_token": intra / tokens,
            "all_bytes_per_token": (inter + intra + island) / tokens,
            "bf16_bytes_per_token": last["wire_bf16_bytes"] / tokens, "outer_steps": last.get("outer_steps", 0),
            "skipped_steps": last["skipped_steps"], "train_s": last["elapsed_s"],
            "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
            "train_curve": [[r["step"], r["loss"]] for r in records]}


def common_step(rows: list[dict]) -> int:
    """The last evaluation every run of the group reached (the final one unless a run was cut short)."""
    return min(row["val_curve"][-1][0] for row in rows)


def val_at(row: dict, step: int) -> float:
    return dict(map(tuple, row["val_curve"]))[step]


def table(rows: list[dict], reference: dict) -> str:
    at = common_step(rows)
    ref_val = val_at(reference, at)
    lines = [(f"| run | steps run | train loss (last 8 steps) | val loss at step {at} | vs `{reference['name']}` | "
              "bytes/token, all links | inter-node/island bytes/token | all-link bytes vs reference | outer steps |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        val = val_at(r, at)
        fewer = reference["all_bytes_per_token"] / r["all_bytes_per_token"]
        cut = "" if r["finished"] else " (cut short)"
        lines.append(f"| `{r['name']}` {r['label']} | {r['steps']}{cut} | {r['train_loss']:.4f} | {val:.4f} | "
                     f"{(val - ref_val) / ref_val:+.2%} | {r['all_bytes_per_token']:,.0f} | "
                     f"{r['inter_bytes_per_token']:,.0f} | {fewer:,.1f}x fewer | {r['outer_steps']} |")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    runs_dir = Path(args.runs_dir)
    rows = [row for run in GRID if (row := summarize(run, runs_dir, args.steps)) is not None and row["val_curve"]]
    by_name = {r["name"]: r for r in rows}
    corpus = json.loads(Path(args.corpus_json).read_text()) if args.corpus_json else None
    groups = {"convergence-w8": [r for r in rows if r["name"].startswith("w8-")],
              "convergence-w32": [r for r in rows if r["name"].startswith("w32-")],
              "local-updates": [by_name[n] for n in ("w8-baseline", "w8-sdp4bit") if n in by_name]
              + [r for r in rows if r["study"] == "local-updates"]}
    out = RESULTS / "gpu-study-125m"
    out.mkdir(parents=True, exist_ok=True)
    text = []
    for tag, group in groups.items():
        if not group:
            continue
        reference = next(r for r in group if r["name"].endswith("-baseline"))
        plot_val_loss(group, out / f"val_loss-{tag}.png", f"{tag}: GPT 125M, virtual ranks, {args.device}")
        text.append(f"### {tag}\n\n{table(group, reference)}\n")
    for row in rows:
        (out / row["name"]).mkdir(exist_ok=True)
        (out / row["name"] / "metrics.jsonl").write_bytes((runs_dir / row["name"] / "metrics.jsonl").read_bytes())
    (out / "summary.json").write_text(json.dumps({"steps": args.steps, "batch": BATCH, "seq_len": SEQ_LEN,
                                                  "corpus": corpus, "device": args.device, "runs": rows}, indent=1))
    commands = "\n".join("python " + r["command"].split(" ", 1)[1] for r in rows if r["command"])  # any interpreter
    (out / "README.md").write_text(README.format(device=args.device, corpus=json.dumps(corpus), tables="\n".join(text),
                                                 commands=commands, steps=args.steps, batch=BATCH, seq_len=SEQ_LEN, tokens=args.steps * BATCH * SEQ_LEN))
    print("\n".join(text))


README = """# GPT 125M on one GPU with virtual ranks: convergence per mode, and local updates

Made on one {device} by `scripts/gpu_study.py` (the device calls: docs/gpu_runbook.md), reading in
docs/convergence.md. Every run: GPT 125M (123.6M parameters, 12 layers, d=768, GPT-2 BPE), global
batch {batch} x {seq_len} tokens, {steps} steps ({tokens:,} tokens), AdamW lr 1e-3 -> 1e-4 cosine, warm-up
steps/16, seed 0, bf16 compute; runs side by side on the GPU. Corpus: the Python files of torch,
transformers, jax, scipy, sympy, sklearn, pandas, numpy and matplotlib installed on that machine,
tokenized there by `python scripts/gpu_study.py prepare` ({corpus}; validation = the last 0.5% of
every file). Nothing of it is redistributed.

Columns: train loss = mean of the last 8 steps; val loss on 4 x 8 micro-batches per virtual rank at
the last evaluation every run of the table reached (runs marked "cut short" were stopped by the
call's 10-minute limit); bytes are summed over all ranks per training token.

{tables}
Curves: `val_loss-*.png`; logs: `<run>/metrics.jsonl`; all numbers: `summary.json`.

Commands (on the GPU machine; /tmp/py.bin from `prepare`):

```
{commands}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="tokenize the installed packages' Python files")
    p.add_argument("--data", required=True)
    for verb in ("probe", "run"):
        p = sub.add_parser(verb)
        p.add_argument("--runs", required=True, help=f"comma-separated names from: {','.join(BY_NAME)}")
        p.add_argument("--data", required=True)
        p.add_argument("--runs-dir", default="runs/gpu-study")
        if verb == "probe":
            p.add_argument("--budget-s", type=float, required=True, help="seconds the real runs may take")
        else:
            p.add_argument("--steps", type=int, required=True)
            p.add_argument("--deadline-s", type=float, required=True, help="kill runs still going after this")
    p = sub.add_parser("report", help="tables, plots and summaries under benchmarks/results/")
    p.add_argument("--runs-dir", default="runs/gpu-study")
    p.add_argument("--steps", type=int, required=True, help="the step count the runs were started with")
    p.add_argument("--corpus-json", help="the token file's sidecar JSON from prepare-data")
    p.add_argument("--device", default="one GPU", help="device name for the plots and summaries")
    args = parser.parse_args()
    {"prepare": prepare, "probe": probe, "run": run, "report": report}[args.verb](args)


if __name__ == "__main__":
    main()
