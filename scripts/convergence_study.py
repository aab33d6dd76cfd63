"""Issue 19: does 4-bit communication keep the loss? A paired multi-seed study on one GPU with virtual
ranks, resumable across short device calls, whose statistics come from halfbyte.bench.paired_stats.

Design (docs/convergence.md, "The paired study" says why): a 21.0M-parameter GPT (6 layers, d=512,
8 heads, the built-in 4096-token BPE), 1024 steps of 128 x 512 tokens (67.1M tokens, 3.2 per
parameter), AdamW 1.5e-3 with a cosine decay that ends at the last step, and the final validation loss
on a fixed set of 2,097,152 held-out tokens spread over the whole validation file. Arms are
communication presets: baseline (bf16), sdp4bit, qw4 (direct int4 weights: the negative control),
zeropp, then qwd and tlq-hs; W=8 virtual ranks as 2 nodes x 4 GPUs for every arm, W=32 as 4 x 8 for
baseline and sdp4bit; seeds 0-3. For a seed k every arm starts from the same weights and sees the
same batches (`--seed k` drives initialization, data order and rounding seeds), so the statistic is
the per-seed difference arm - baseline of the final validation loss.

On the GPU machine (the repository is the working directory; runs/ is ignored by git):

    python3 scripts/convergence_study.py prepare                  # corpus -> runs/convergence-data/ (cached)
    python3 scripts/convergence_study.py run --deadline-s 540 --parallel 8
    tar czf $OUT/runs.tgz --exclude=checkpoints --exclude=tensorboard -C runs/convergence .

`run` starts the unfinished runs of the grid (in priority order, --parallel at a time, each one
`halfbyte train ... --resume auto`) in runs/convergence/, watches their rates and, if not all of them
can end before the deadline, stops the last-started ones early so that the others do (a run cut at
the deadline is lost on a fresh machine; only back-to-back calls keep checkpoints). No run starts
while the kept ones run; after them the shed ones resume first (from the checkpoint SIGTERM saved).
It starts no run that cannot end in time by the runs finished in this call (their time alone, times
the runs it would share the GPU with), sends SIGTERM --stop-margin-s before the deadline (halfbyte
train saves a checkpoint and exits), and the next call resumes what was stopped.
Runs finished in earlier calls are skipped if their directories are in runs/convergence-done/ (the
calls' runs.tgz unpacked here and carried there: a separate directory, so that carrying it never
replaces a warm machine's checkpoints). A run directory holds metrics.jsonl, train.log, command.txt
and provenance.json (design, data size and sha256, code version, start and end of every segment).

Here, after each call (`mkdir -p runs/convergence-done; tar xzf runs.tgz -C runs/convergence-done`):

    python scripts/convergence_study.py plan                       # the grid, its status, the commands
    python scripts/convergence_study.py report [--same-commit]     # -> benchmarks/results/convergence-21m/

`report` pairs finished runs by seed, refuses (one line, exit 2) runs whose recorded design, data or
(with --same-commit) code differ, and writes <arm>-w<W>-seed<k>/{metrics.jsonl,command.txt,
provenance.json}, summary.json (paired statistics per arm vs baseline at W=8 and W=32), convergence.png
(validation curves with seed bands; paired gaps with 95% CIs) and README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # halfbyte from this checkout, also where it is not installed (the GPU machine)

# scripts/ is on sys.path when a script runs, so its shared module imports by name
from study_common import corpus_dirs  # noqa: E402

MODEL_TAG = "21m"
RESULTS = ROOT / "benchmarks" / "results" / f"convergence-{MODEL_TAG}"
RUNS_DIR = ROOT / "runs" / "convergence"  # where runs train (checkpoints included)
DONE_DIR = ROOT / "runs" / "convergence-done"  # earlier calls' run directories, unpacked here, carried there
DATA = ROOT / "runs" / "convergence-data" / "py-builtin.bin"
TOKENIZER, VAL_FRACTION = "builtin", 0.02  # 4096-token BPE: a small embedding; 2% of every file: ~4M val tokens

STEPS, BATCH, SEQ_LEN = 1024, 128, 512
EVAL_TOKENS = 1 << 21  # 4096 windows of 512 tokens, spread over the whole validation file
N_LAYER, D_MODEL, N_HEAD, VOCAB = 6, 512, 8, 4096
# What shapes a run's math, identical for every run of the study: recorded with each run and compared
# by `report` (every value explicit, so a changed default elsewhere cannot change the study silently).
DESIGN: dict[str, str] = {
    "--model": "tiny", "--model.n_layer": str(N_LAYER), "--model.d_model": str(D_MODEL),
    "--model.n_head": str(N_HEAD), "--model.ctx": str(SEQ_LEN), "--model.rope": "true", "--model.dropout": "0",
    "--steps": str(STEPS), "--batch-size": str(BATCH), "--train.seq_len": str(SEQ_LEN),
    "--lr": "1.5e-3", "--schedule.min_lr": "1.5e-4", "--schedule.warmup_steps": "64", "--optim.betas": "0.9,0.95",
    "--optim.eps": "1e-8", "--optim.weight_decay": "0.1", "--engine.grad_clip": "1.0",
    "--engine.bucket_numel": "25000000", "--train.eval_tokens": str(EVAL_TOKENS), "--train.dtype": "bf16",
    "--train.weight_decay_on": "all",
}
# Design keys added after runs were recorded, with the value those runs had: runs recorded before
# --train.weight_decay_on existed trained with weight decay on every parameter.
DESIGN_ADDED_LATER: dict[str, str] = {"--train.weight_decay_on": "all"}
# What only shapes the outputs: 8 evaluations of 2M tokens (~8% of a run), a checkpoint every quarter
# (a run killed outright loses at most 256 steps; SIGTERM saves one at once).
OUTPUT_ARGS = ("--train.eval_interval", "128", "--train.log_interval", "16", "--train.checkpoint_interval", "256",
               "--train.keep_checkpoints", "1", "--train.check_replicas_interval", "0", "--train.sample_tokens", "0")

ARMS = {
    "baseline": "bf16 weights and gradients",
    "sdp4bit": "qWD int4 weights + TLq-HS 8/4-bit gradients",
    "qw4": "direct int4 weights (negative control)",
    "zeropp": "int8 weights, 4/4-bit two-level gradients",
    "qwd": "qWD int4 weights only",
    "tlq-hs": "TLq-HS 8/4-bit gradients only",
}
LAYOUT = {8: 4, 32: 8}  # virtual ranks W -> GPUs per emulated node (W=8: 2 x 4, W=32: 4 x 8)
SEEDS = 4
TARGET_PCT = 0.3
CHECKPOINT_MARKER = "COMPLETE"  # halfbyte.engine.checkpoint.MARKER: a checkpoint directory is complete
GATE_SAFETY = 1.1  # a run starts (or is kept) only if 1.1 x its predicted time ends before the stop
MIN_RATE_STEPS = 48  # steps a run's rate is measured over before it predicts the run's end


class StudyError(Exception):
    """A user mistake or a refused input: one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Run:
    arm: str
    world: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-w{self.world}-seed{self.seed}"

    @property
    def gpus_per_node(self) -> int:
        return LAYOUT[self.world]


def grid(seeds: int = SEEDS) -> list[Run]:
    """Every run, in the order they are started: the W=8 core arms seed by seed (so a call's first
    wave already pairs every arm with its baseline), then W=32, then the single-technique arms."""
    core = [Run(arm, 8, s) for s in range(seeds) for arm in ("baseline", "sdp4bit", "qw4", "zeropp")]
    wide = [Run(arm, 32, s) for s in range(seeds) for arm in ("baseline", "sdp4bit")]
    parts = [Run(arm, 8, s) for s in range(seeds) for arm in ("qwd", "tlq-hs")]
    return core + wide + parts


def gpt_params(n_layer: int = N_LAYER, d_model: int = D_MODEL, vocab: int = VOCAB) -> int:
    """Parameters of halfbyte's GPT (tied embedding, bias-free linears and LayerNorms, RoPE)."""
    return 12 * n_layer * d_model ** 2 + vocab * d_model + (2 * n_layer + 1) * d_model


def rel(path: Path) -> str:
    """A path as the commands write it: relative to the repository root (their working directory)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def train_argv(run: Run, data: Path, runs_dir: Path, train_cmd: list[str]) -> list[str]:
    """The exact command of one run. Only --seed, --virtual-ranks / --virtual-gpus-per-node /
    micro-batch, --preset and the names differ between runs."""
    design = [x for kv in DESIGN.items() for x in kv]
    return [*train_cmd, *design, *OUTPUT_ARGS, "--data", rel(data), "--seed", str(run.seed),
            "--virtual-ranks", str(run.world), "--virtual-gpus-per-node", str(run.gpus_per_node),
            "--train.micro_batch_size", str(BATCH // run.world), "--preset", run.arm,
            "--train.name", run.name, "--out", rel(runs_dir / run.name), "--resume", "auto"]


# ------------------------------------------------------------------------------------ run state


def final_val_loss(records: list[dict]) -> float | None:
    """The validation loss at the last step (after the LR schedule's end), or None if not reached."""
    last = [r for r in records if r.get("step") == STEPS and "val_loss" in r]
    return float(last[-1]["val_loss"]) if last else None


def newest_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (what `--resume auto` continues from), else 0."""
    steps = [int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
             if p.is_dir() and (p / CHECKPOINT_MARKER).is_file() and p.name.removeprefix("step_").isdigit()]
    return max(steps, default=0)


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records; a last line still being written (or torn by a kill) is left out."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise StudyError(f"{rel(path)} line {i + 1} is not JSON; the run's metrics are damaged") from None
    return records


def status(run_dir: Path) -> str:
    """done | partial (step N, resumable from M) | pending."""
    records = read_metrics(run_dir)
    if final_val_loss(records) is not None:
        return "done"
    if records:
        return f"partial (step {records[-1]['step']}, resumes from {newest_checkpoint_step(run_dir)})"
    return "pending"


def read_provenance(run_dir: Path) -> dict | None:
    path = run_dir / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    """Write atomically: a call cut short never leaves half a file for the next one to read."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- provenance


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(data: Path) -> dict[str, Any]:
    """Size, sha256 and token count of the training and validation files, and how they were made
    (prepare-data's sidecar); hashed once per file version (cached beside it by size and mtime)."""
    from halfbyte.train.data import open_tokens, val_path_for
    from halfbyte.train.prepare_cli import sidecar_path

    val = val_path_for(data)
    for path in (data, val):
        if not path.is_file():
            raise StudyError(f"data file {rel(path)} does not exist; run `python3 scripts/convergence_study.py "
                             f"prepare --data {rel(data)}` first")
    stamp = [[p.stat().st_size, p.stat().st_mtime_ns] for p in (data, val)]
    cache = data.with_name(data.name + ".identity.json")
    if cache.is_file() and (cached := json.loads(cache.read_text())).get("stamp") == stamp:
        return cached["identity"]
    sidecar = sidecar_path(data)
    identity = {"train_file": data.name, "train_bytes": data.stat().st_size, "train_sha256": _sha256(data),
                "train_tokens": len(open_tokens(data)), "val_bytes": val.stat().st_size,
                "val_sha256": _sha256(val), "val_tokens": len(open_tokens(val)),
                "prepared": json.loads(sidecar.read_text()) if sidecar.is_file() else None}
    write_json(cache, {"stamp": stamp, "identity": identity})
    return identity


def code_version() -> dict[str, Any]:
    """The git commit where .git exists (the GPU machine's copy of the tree has none) and, always, a
    sha256 over halfbyte/**/*.py (path and content): the code that trained, committed or not."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "halfbyte").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "halfbyte"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"commit": commit, "halfbyte_dirty": dirty, "code_sha": digest.hexdigest()[:16]}


def device_name() -> str:
    """The GPU's name from nvidia-smi, or `cpu` (what the runs of a segment ran on)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        names = out.stdout.strip().splitlines()
        return names[0].strip() if out.returncode == 0 and names else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def recorded_design(provenance: dict) -> dict[str, str]:
    """A run's recorded design, with the keys added later at the value it trained with."""
    return {**DESIGN_ADDED_LATER, **provenance["design"]}


def check_recorded(run: Run, recorded: dict | None, data: dict[str, Any], run_dir: Path) -> None:
    """Refuse to continue a run that was started with another design or data (it could not be paired)."""
    if (run_dir / "metrics.jsonl").is_file() and recorded is None:
        raise StudyError(f"{rel(run_dir)} holds a run without provenance.json (not made by this script); "
                         "move it away or choose another --runs-dir")
    if recorded is None:
        return
    design = recorded_design(recorded)
    if design != DESIGN:
        key = next(k for k in sorted(set(DESIGN) | set(design)) if DESIGN.get(k) != design.get(k))
        raise StudyError(f"{rel(run_dir)} was started with {key} {design.get(key)}, this design has "
                         f"{DESIGN.get(key)}; move it away or choose another --runs-dir")
    for key in ("train_sha256", "val_sha256"):
        if recorded["data"][key] != data[key]:
            raise StudyError(f"{rel(run_dir)} was trained on other data ({key} {recorded['data'][key][:12]}, "
                             f"now {data[key][:12]}); move it away or choose another --runs-dir")


# ----------------------------------------------------------------------------------------- run


@dataclass
class Child:
    run: Run
    proc: subprocess.Popen
    started_s: float
    from_step: int
    log: IO[str]
    segment: int  # index into the run's provenance segments
    window: tuple[float, int] | None = None  # (time, step) where its current rate measurement began
    step: int = 0  # the last step seen in its metrics.jsonl
    shed: bool = False  # stopped early so that the runs before it finish in this call
    shared_s: float = 0.0  # the integral over its life of how many runs shared the GPU (run-seconds)


def fits(estimate_s: float | None, remaining_fraction: float, now_s: float, stop_s: float) -> bool:
    """Whether a run should start now: yes without an estimate (the first wave of a call), else only if
    it is predicted to end before the stop. A run cut at the stop resumes only while the machine keeps
    its checkpoints (back-to-back calls); on a fresh machine it would start over."""
    return estimate_s is None or now_s + GATE_SAFETY * estimate_s * remaining_fraction <= stop_s


def solo_run_s(wall_s: float, shared_s: float, steps_done: int) -> float:
    """A full run's time alone on the GPU, from a segment that did steps_done steps in wall_s while
    shared_s/wall_s runs shared the GPU on average (even sharing, the model keep_count also uses)."""
    return wall_s * STEPS / steps_done / max(1.0, shared_s / wall_s)


def keep_count(remaining_s: list[float], time_left_s: float) -> int:
    """How many of k runs sharing the GPU (priority order; remaining_s[i]: run i's time to its end at
    the current sharing) to keep so that every kept run ends within time_left_s, if the GPU's work is
    shared evenly (keeping k' of k makes each k/k' times faster). All k when not even the first could
    end in time alone: shedding would buy nothing in this call, and a back-to-back call resumes them."""
    k = len(remaining_s)
    for keep in range(k, 0, -1):
        if all(GATE_SAFETY * r * keep / k <= time_left_s for r in remaining_s[:keep]):
            return keep
    return k


def last_step(run_dir: Path) -> int:
    """The last step in a run's metrics.jsonl, else 0."""
    records = read_metrics(run_dir)
    return int(records[-1]["step"]) if records else 0


class Launcher:
    """Runs a list of runs as subprocesses, --parallel at a time, until done or the deadline. Once every
    run has advanced MIN_RATE_STEPS steps under the current sharing, their rates predict their ends; if
    some would end after the stop, the last-started ones are stopped (`shed`, resumable) so that the
    others finish: on a fresh machine a run cut at the stop is lost, a finished one is not."""

    def __init__(self, runs_dir: Path, data: Path, train_cmd: list[str], parallel: int, deadline_s: float,
                 stop_margin_s: float, poll_s: float) -> None:
        self.runs_dir, self.data, self.train_cmd = runs_dir, data, train_cmd
        self.parallel, self.deadline_s, self.stop_s = parallel, deadline_s, deadline_s - stop_margin_s
        self.poll_s = poll_s
        self.identity = data_identity(data)
        self.code, self.device, self.host = code_version(), device_name(), socket.gethostname()
        self.solo_run_s: dict[int, float] = {}  # W -> the slowest full run alone implied by runs ended here
        self.kept: set[str] = set()  # the runs kept at a shed: no run starts while one of them runs
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def estimate(self, run: Run, sharing: int) -> float | None:
        """A full run's predicted time when `sharing` runs share the GPU (even sharing; the rates
        measured once it runs correct a wrong guess by shedding the last-started runs)."""
        solo = self.solo_run_s.get(run.world)
        return None if solo is None else solo * sharing

    def start(self, run: Run, from_step: int) -> Child:
        run_dir = self.runs_dir / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = train_argv(run, self.data, self.runs_dir, self.train_cmd)
        provenance = read_provenance(run_dir) or {
            "run": run.name, "arm": run.arm, "world": run.world, "gpus_per_node": run.gpus_per_node,
            "nodes": run.world // run.gpus_per_node, "seed": run.seed, "design": DESIGN, "data": self.identity,
            "output_args": list(OUTPUT_ARGS), "segments": []}
        provenance["segments"].append({"start_utc": utc_now(), "from_step": from_step, "command": argv,
                                       **self.code, "host": self.host, "device": self.device})
        write_json(run_dir / "provenance.json", provenance)
        commands = {json.dumps(s["command"]) for s in provenance["segments"]}
        (run_dir / "command.txt").write_text("".join(shlex.join(json.loads(c)) + "\n" for c in sorted(commands)))
        log = open(run_dir / "train.log", "a")
        log.write(f"=== {utc_now()} segment {len(provenance['segments'])}, from step {from_step}: "
                  f"{shlex.join(argv)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"{self.now():6.0f} s  start {run.name} (from step {from_step})", flush=True)
        return Child(run, proc, self.now(), from_step, log, len(provenance["segments"]) - 1, step=from_step)

    def end(self, child: Child, stopping: bool) -> str:
        """Record how a segment ended; returns the run's status (`failed (exit N): ...` for a run that
        exited non-zero unasked)."""
        child.log.close()
        run_dir = self.runs_dir / child.run.name
        wall = self.now() - child.started_s
        state, code = status(run_dir), child.proc.returncode
        stopped = None if state == "done" else "shed" if child.shed else "deadline" if stopping else None
        provenance = read_provenance(run_dir)
        provenance["segments"][child.segment] |= {"end_utc": utc_now(), "exit_code": code, "wall_s": round(wall, 1),
                                                  "to_step": last_step(run_dir), "stopped": stopped}
        write_json(run_dir / "provenance.json", provenance)
        if state == "done" and STEPS > child.from_step and wall > 0:
            solo = solo_run_s(wall, child.shared_s, STEPS - child.from_step)
            self.solo_run_s[child.run.world] = max(self.solo_run_s.get(child.run.world, 0.0), solo)
        if code != 0 and stopped is None:
            state = f"failed (exit {code}): {state}"
        elif stopped:
            state += f", stopped ({stopped})"
        print(f"{self.now():6.0f} s  {child.run.name}: exit {code}, {state}, {wall:.0f} s this call", flush=True)
        if state.startswith("failed"):
            tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-6:]
            print(f"--- {child.run.name}: end of its train.log:", *tail, sep="\n", flush=True)
        return state

    def shed_late(self, running: list[Child], now: float) -> None:
        """Measure each live run's rate since its window opened; shed runs if not all can end in time."""
        live = [c for c in running if not c.shed]
        for c in live:
            c.step = last_step(self.runs_dir / c.run.name)
            if c.window is None and c.step > c.from_step:
                c.window = (now, c.step)
        if not live or any(c.window is None or c.step - c.window[1] < MIN_RATE_STEPS for c in live):
            return
        remaining = [(STEPS - c.step) * (now - c.window[0]) / (c.step - c.window[1]) for c in live]
        keep = keep_count(remaining, self.stop_s - now)
        if keep == len(live):
            return
        self.kept = {c.run.name for c in live[:keep]}
        for c in live[keep:]:
            c.shed = True
            c.proc.send_signal(signal.SIGTERM)
        for c in live[:keep]:
            c.window = None  # faster now: measure again
        print(f"{now:6.0f} s  {len(live)} runs would end {max(remaining):.0f} s from now, after the stop at "
              f"{self.stop_s:.0f} s: shed {', '.join(c.run.name for c in live[keep:])}", flush=True)

    def execute(self, runs: list[Run]) -> dict[str, str]:
        """Run `runs` (none done); returns each one's status at the end of the call."""
        pending, running, outcome, stopping = list(runs), [], {}, False
        last_poll = self.now()
        while pending or running:
            now = self.now()
            for child in running:
                child.shared_s += (now - last_poll) * len(running)
            last_poll = now
            ended = [c for c in running if c.proc.poll() is not None]
            for child in ended:
                running.remove(child)
                outcome[child.run.name] = self.end(child, stopping)
                if child.shed and not stopping and status(self.runs_dir / child.run.name) != "done":
                    pending.insert(0, child.run)  # resumes from its checkpoint once the kept runs end
            now = self.now()
            if not stopping and now >= self.stop_s:
                stopping = True
                for child in running:
                    child.proc.send_signal(signal.SIGTERM)  # halfbyte train saves a checkpoint and exits
                print(f"{now:6.0f} s  stop: SIGTERM to {len(running)} run(s); {len(pending)} not started", flush=True)
            if stopping:
                if not running:
                    break
                if now >= self.deadline_s:
                    for child in running:
                        child.proc.kill()  # its last periodic checkpoint stays
                        child.proc.wait()
                    continue
            started = 0
            # while runs kept at a shed still run, starting another would slow them past the stop
            protecting = any(c.run.name in self.kept for c in running)
            while not stopping and not protecting and pending and len(running) < self.parallel:
                run = pending.pop(0)
                from_step = newest_checkpoint_step(self.runs_dir / run.name)
                if fits(self.estimate(run, len(running) + 1), (STEPS - from_step) / STEPS, now, self.stop_s):
                    running.append(self.start(run, from_step))
                    started += 1
                else:
                    outcome[run.name] = "not started: predicted to end after the stop"
            if ended or started:
                for child in running:
                    child.window = None  # the sharing changed: rates are measured again
            if not stopping:
                self.shed_late(running, now)
            time.sleep(self.poll_s)
        for run in pending:
            outcome.setdefault(run.name, "not started: deadline")
        return outcome


def run_status(run: Run, args: argparse.Namespace) -> str:
    """The run's status in --runs-dir, or `done (earlier call)` when --done-in holds it finished."""
    if status(Path(args.done_in) / run.name) == "done":
        return "done (earlier call)"
    return status(Path(args.runs_dir) / run.name)


def select(args: argparse.Namespace) -> list[Run]:
    runs = grid(args.seeds)
    if args.only:
        names = args.only.split(",")
        by_name = {r.name: r for r in runs}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise StudyError(f"--only: unknown run(s) {', '.join(unknown)}; `plan` lists them")
        runs = [by_name[n] for n in names]
    return runs


def cmd_run(args: argparse.Namespace) -> int:
    if args.parallel < 1 or args.deadline_s <= args.stop_margin_s:
        raise StudyError(f"need --parallel >= 1 and --deadline-s > --stop-margin-s ({args.stop_margin_s:g}), got "
                         f"--parallel {args.parallel} --deadline-s {args.deadline_s:g}")
    runs_dir, data = Path(args.runs_dir), Path(args.data)
    launcher = Launcher(runs_dir, data, shlex.split(args.train_cmd), args.parallel, args.deadline_s,
                        args.stop_margin_s, args.poll_s)
    if launcher.identity["val_tokens"] - 1 < EVAL_TOKENS:
        raise StudyError(f"{rel(data)}'s validation file has {launcher.identity['val_tokens']:,} tokens, fewer than "
                         f"the evaluation set of {EVAL_TOKENS:,}; prepare it with a larger --val-fraction")
    todo = []
    for run in select(args):
        for where in (runs_dir, Path(args.done_in)):
            check_recorded(run, read_provenance(where / run.name), launcher.identity, where / run.name)
        if not run_status(run, args).startswith("done"):
            todo.append(run)
    if not todo:
        print("nothing to run: every selected run is done", flush=True)
        return 0
    print(f"{len(todo)} run(s) to go, {args.parallel} at a time, deadline {args.deadline_s:.0f} s; "
          f"code {launcher.code['code_sha']} (commit {launcher.code['commit']}), {launcher.device}", flush=True)
    outcome = launcher.execute(todo)
    counts: dict[str, int] = {}
    for state in outcome.values():
        key = state.split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    failed = [name for name, state in outcome.items() if state.startswith("failed")]
    print(f"this call: {counts}; failed: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize the installed packages' Python files (study_common.CORPUS_PACKAGES) with the built-in
    BPE into --data, unless a file made the same way is there."""
    from halfbyte.train.prepare_cli import sidecar_path

    data = Path(args.data)
    sidecar = sidecar_path(data)
    if data.is_file() and sidecar.is_file():
        made = json.loads(sidecar.read_text())
        if made.get("tokenizer") == TOKENIZER and made.get("val_fraction") == VAL_FRACTION:
            print(f"{rel(data)}: cached ({made['train_tokens']:,} training, {made['val_tokens']:,} validation "
                  "tokens)", flush=True)
            return 0
    inputs = args.inputs or corpus_dirs()
    if not inputs:
        raise StudyError("none of the corpus packages is installed here; pass --inputs DIR ...")
    cmd = [sys.executable, "-m", "halfbyte", "prepare-data", *inputs, "--glob", "*.py", "--tokenizer", TOKENIZER,
           "--val-fraction", str(VAL_FRACTION), "--out", str(data)]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


# ------------------------------------------------------------------------------------------ plan


def cmd_plan(args: argparse.Namespace) -> int:
    runs_dir, data = Path(args.runs_dir), Path(args.data)
    runs = select(args)
    print(f"GPT {gpt_params() / 1e6:.2f}M parameters ({N_LAYER} layers, d={D_MODEL}, {N_HEAD} heads, vocab {VOCAB}); "
          f"{STEPS} steps x {BATCH} x {SEQ_LEN} = {STEPS * BATCH * SEQ_LEN / 1e6:.1f}M tokens "
          f"({STEPS * BATCH * SEQ_LEN / gpt_params():.1f} per parameter); eval {EVAL_TOKENS:,} tokens; "
          f"{len(runs)} runs\n")
    print(f"{'run':<22} {'arm':<9} {'W':>3} {'layout':>6} {'seed':>4}  status")
    for run in runs:
        layout = f"{run.world // run.gpus_per_node}x{run.gpus_per_node}"
        print(f"{run.name:<22} {run.arm:<9} {run.world:>3} {layout:>6} {run.seed:>4}  {run_status(run, args)}")
    print("\n# data (cached):")
    print(shlex.join(["python3", "scripts/convergence_study.py", "prepare", "--data", rel(data)]))
    print("# each run (what `run` starts):")
    for run in runs:
        print(shlex.join(train_argv(run, data, runs_dir, ["python3", "-m", "halfbyte", "train"])))
    return 0


# ---------------------------------------------------------------------------------------- report


@dataclass
class Record:
    run: Run
    dir: Path
    provenance: dict
    metrics: list[dict]

    @property
    def final(self) -> float | None:
        return final_val_loss(self.metrics)


def collect(runs_dir: Path) -> list[Record]:
    records = []
    for path in sorted(runs_dir.glob("*/provenance.json")):
        p = json.loads(path.read_text())
        records.append(Record(Run(p["arm"], p["world"], p["seed"]), path.parent, p, read_metrics(path.parent)))
    if not records:
        raise StudyError(f"no study runs (*/provenance.json) under {runs_dir}; unpack the calls' runs.tgz there")
    return records


def check_pairable(records: list[Record], same_commit: bool) -> None:
    """One design, one data set (and with same_commit one code version) for every run, or StudyError
    naming the first difference."""
    first = records[0]
    for r in records[1:]:
        a, b = first.provenance, r.provenance
        da, db = recorded_design(a), recorded_design(b)
        for key in sorted(set(da) | set(db)):
            if da.get(key) != db.get(key):
                raise StudyError(f"runs differ in their design: {key} {da.get(key)} in {first.run.name}, "
                                 f"{db.get(key)} in {r.run.name}; report only runs of one design")
        for key in ("train_sha256", "val_sha256"):
            if a["data"][key] != b["data"][key]:
                raise StudyError(f"runs differ in their data: {key} {a['data'][key][:12]} in {first.run.name}, "
                                 f"{b['data'][key][:12]} in {r.run.name}; report only runs of one data set")
    if same_commit:
        versions = {(s["code_sha"], s["commit"]): r.run.name for r in records for s in r.provenance["segments"]}
        if len(versions) > 1:
            (v1, n1), (v2, n2) = list(versions.items())[:2]
            raise StudyError(f"--same-commit: runs were made with different code (code_sha {v1[0]}, commit "
                             f"{v1[1]} in {n1}; code_sha {v2[0]}, commit {v2[1]} in {n2})")


def compare(records: list[Record], target_pct: float) -> dict[str, Any]:
    """Paired statistics per world size: every arm's final losses against the baseline's, by seed."""
    from halfbyte.bench.paired_stats import paired_gap

    finals: dict[int, dict[str, dict[int, float]]] = {}
    for r in records:
        if r.final is not None:
            finals.setdefault(r.run.world, {}).setdefault(r.run.arm, {})[r.run.seed] = r.final
    out: dict[str, Any] = {}
    for world in sorted(finals):
        base = finals[world].get("baseline", {})
        block: dict[str, Any] = {"layout": f"{world // LAYOUT[world]} nodes x {LAYOUT[world]} GPUs",
                                 "baseline": {"seeds": sorted(base), "final_val_loss": [base[s] for s in sorted(base)]},
                                 "arms": {}}
        for arm in (a for a in ARMS if a != "baseline" and a in finals[world]):
            try:
                block["arms"][arm] = paired_gap(finals[world][arm], base).to_dict(target_pct)
            except ValueError as e:
                block["arms"][arm] = {"n_seeds": len(set(finals[world][arm]) & set(base)), "note": str(e)}
        out[f"w{world}"] = block
    return out


def plot(records: list[Record], comparisons: dict[str, Any], path: Path, title: str, target_pct: float) -> None:
    """Validation curves per arm (mean over seeds, band = min..max) for each world size, and the paired
    gaps in % of baseline: one dot per seed, the mean with its 95% CI, the +-target band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r.run.world for r in records if r.final is not None})
    fig, axes = plt.subplots(1, len(worlds) + 1, figsize=(6.2 * (len(worlds) + 1), 5))
    colors = dict(zip(ARMS, plt.get_cmap("tab10").colors))
    for ax, world in zip(axes, worlds):
        lows = []
        for arm in ARMS:
            curves = [dict((m["step"], m["val_loss"]) for m in r.metrics if "val_loss" in m) for r in records
                      if r.run.world == world and r.run.arm == arm and r.final is not None]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            losses = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in losses], marker=".", color=colors[arm],
                    label=f"{arm} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
            ax.fill_between(steps, [min(v) for v in losses], [max(v) for v in losses], color=colors[arm], alpha=0.2)
            lows += [v for s, vs in zip(steps, losses) if s >= STEPS // 4 for v in vs]
        if lows:  # the last three quarters, where the arms separate (earlier points run off the top)
            ax.set_ylim(min(lows) - 0.02, max(lows) + 0.02)
        ax.set(title=f"W={world} ({world // LAYOUT[world]}x{LAYOUT[world]}): validation loss", xlabel="step",
               ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    gaps = axes[-1]
    rows = [(f"{arm} W={key[1:]}", arm, g) for key, block in comparisons.items()
            for arm, g in block["arms"].items() if "pct" in g]
    for y, (label, arm, g) in enumerate(rows):
        per_seed = [100 * d / b for d, b in zip(g["differences_nats"], g["baseline_loss"])]
        gaps.plot(per_seed, [y] * len(per_seed), "o", color=colors[arm], alpha=0.35, ms=5)
        p = g["pct"]
        gaps.errorbar([p["mean"]], [y], xerr=[[p["mean"] - p["ci_low"]], [p["ci_high"] - p["mean"]]], fmt="D",
                      color=colors[arm], capsize=5, ms=7)
    gaps.axvline(0, color="k", lw=0.8)
    gaps.axvspan(-target_pct, target_pct, color="green", alpha=0.1, label=f"+-{target_pct:g}% target")
    gaps.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    gaps.invert_yaxis()  # first arm on top
    gaps.set(title="final val loss, arm - baseline, paired by seed (mean, 95% CI)", xlabel="% of baseline loss")
    gaps.grid(alpha=0.3, axis="x")
    gaps.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(comparisons: dict[str, Any]) -> str:
    lines = ["| arm | W | seeds | baseline loss | gap (nats) | 95% CI (nats) | gap (% of baseline) | 95% CI (%) "
             "| verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, block in comparisons.items():
        for arm, g in block["arms"].items():
            if "pct" not in g:
                lines.append(f"| {arm} | {key[1:]} | {g['n_seeds']} | | | | | | {g['note']} |")
                continue
            n, p = g["nats"], g["pct"]
            lines.append(f"| {arm} | {key[1:]} | {g['n_seeds']} | {g['baseline_mean']:.4f} | {n['mean']:+.4f} | "
                         f"{n['ci_low']:+.4f} .. {n['ci_high']:+.4f} | {p['mean']:+.3f}% | {p['ci_low']:+.3f} .. "
                         f"{p['ci_high']:+.3f}% | {g['verdict']['text']} |")
    return "\n".join(lines)


README = """# Paired convergence study, GPT {params:.1f}M (issue 19)

Made by `python scripts/convergence_study.py report` from the runs listed in `summary.json` (design,
data hashes, code versions, devices, every run's final validation loss); docs/convergence.md says how
the study is designed and how to read it. Per run: `<arm>-w<W>-seed<k>/metrics.jsonl`, `command.txt`,
`provenance.json`. Figure: `convergence.png`.

{finished} of {planned} planned runs finished{unfinished}.

{table}
"""


def cmd_report(args: argparse.Namespace) -> int:
    records = collect(Path(args.runs_dir))
    check_pairable(records, args.same_commit)
    finished = [r for r in records if r.final is not None]
    if not finished:
        raise StudyError(f"no run under {args.runs_dir} has reached step {STEPS}; nothing to report yet")
    comparisons = compare(records, args.target_pct)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in finished:
        (out / r.run.name).mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "command.txt", "provenance.json"):
            (out / r.run.name / name).write_bytes((r.dir / name).read_bytes())
    planned = {run.name for run in grid(args.seeds)}
    done = {r.run.name for r in finished}
    first = finished[0].provenance
    summary = {
        "study": "issue 19: paired multi-seed convergence, virtual ranks on one GPU",
        "model": {"params": gpt_params(), "n_layer": N_LAYER, "d_model": D_MODEL, "n_head": N_HEAD, "vocab": VOCAB},
        "tokens_per_run": STEPS * BATCH * SEQ_LEN, "design": recorded_design(first), "data": first["data"],
        "target_pct": args.target_pct, "confidence": 0.95,
        "code_versions": sorted({f"{s['code_sha']} (commit {s['commit']})" for r in finished
                                 for s in r.provenance["segments"]}),
        "devices": sorted({s["device"] for r in finished for s in r.provenance["segments"]}),
        "comparisons": comparisons,
        "runs": [{"name": r.run.name, "arm": r.run.arm, "world": r.run.world, "seed": r.run.seed,
                  "final_val_loss": r.final, "segments": len(r.provenance["segments"]),
                  "train_s": r.metrics[-1].get("elapsed_s")} for r in finished],
        "unfinished": sorted({r.run.name for r in records} - done),
        "not_started": sorted(planned - {r.run.name for r in records}),
    }
    write_json(out / "summary.json", summary)
    plot(records, comparisons, out / "convergence.png",
         f"GPT {gpt_params() / 1e6:.1f}M, {STEPS} steps x {BATCH * SEQ_LEN:,} tokens, virtual ranks on "
         f"{', '.join(summary['devices'])}", args.target_pct)
    table = results_table(comparisons)
    unfinished = sorted(summary["unfinished"] + summary["not_started"])
    (out / "README.md").write_text(README.format(
        params=gpt_params() / 1e6, finished=len(finished), planned=len(planned | done), table=table,
        unfinished=f"; still to run: {', '.join(unfinished)}" if unfinished else ""))
    print(table)
    print(f"\n{len(finished)} finished run(s) -> {rel(out)}/ (summary.json, convergence.png, README.md)")
    return 0


# ------------------------------------------------------------------------------------------ main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="convergence_study.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = sub.add_parser("prepare", help="tokenize the installed packages' Python files (cached)")
    p.add_argument("--data", default=rel(DATA), help="token file to write (default: %(default)s)")
    p.add_argument("--inputs", nargs="+", help="directories of *.py files (default: the installed corpus packages)")
    for verb in ("plan", "run"):
        p = sub.add_parser(verb, help={"plan": "print the grid, each run's status and its command",
                                       "run": "run unfinished runs until done or --deadline-s"}[verb])
        p.add_argument("--runs-dir", default=rel(RUNS_DIR), help="one directory per run (default: %(default)s)")
        p.add_argument("--done-in", default=rel(DONE_DIR), help="earlier calls' run directories: runs finished "
                       "there are skipped (default: %(default)s)")
        p.add_argument("--data", default=rel(DATA), help="token file from `prepare` (default: %(default)s)")
        p.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0..N-1 per arm (default: %(default)s)")
        p.add_argument("--only", help="comma-separated run names (default: the whole grid, in its order)")
        if verb == "run":
            p.add_argument("--deadline-s", type=float, required=True, help="every run has exited by then")
            p.add_argument("--parallel", type=int, default=8, help="runs side by side (default: %(default)s)")
            p.add_argument("--stop-margin-s", type=float, default=40.0,
                           help="SIGTERM this long before the deadline (default: %(default)s)")
            p.add_argument("--train-cmd", default=shlex.join([sys.executable, "-m", "halfbyte", "train"]),
                           help="the trainer, followed by the run's options (default: %(default)s)")
            p.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    p = sub.add_parser("report", help="paired statistics, figure and per-run files under benchmarks/results/")
    p.add_argument("--runs-dir", default=rel(DONE_DIR), help="the calls' run directories, unpacked "
                   "(default: %(default)s)")
    p.add_argument("--out", default=rel(RESULTS), help="results directory (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds planned per arm (default: %(default)s)")
    p.add_argument("--target-pct", type=float, default=TARGET_PCT, help="resolution target, %% of baseline "
                   "(default: %(default)s)")
    p.add_argument("--same-commit", action="store_true", help="refuse runs made with different code")
    args = parser.parse_args(argv)
    if getattr(args, "seeds", 1) < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        return {"prepare": cmd_prepare, "plan": cmd_plan, "run": cmd_run, "report": cmd_report}[args.verb](args)
    except StudyError as e:
        print(f"convergence_study.py {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
