"""What the study scripts (convergence_study.py, local_updates_study.py, gpu_study.py) share: where
the Python-source corpus comes from, reading metrics, the validation-loss figure, and the machinery
that runs a paired study's runs on one GPU across short device calls (run state, provenance, the
Launcher, the pieces of `run`, `plan` and `report` that know no design).

The machinery asks a run (a StudyRun: convergence_study.Run, local_updates_study.Run) for what differs
between runs: its name, its steps, its world size and batch, its command and its provenance record; it
reads no design of its own."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import site
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_MARKER = "COMPLETE"  # halfbyte.engine.checkpoint.MARKER: a checkpoint directory is complete
GATE_SAFETY = 1.1  # a run starts (or is kept) only if 1.1 x its predicted time ends before the stop
MIN_RATE_SHARE = 3 / 64  # of its steps a run's rate is measured over before it predicts its end (48 of 1024)

# Large installed packages whose Python files make the GPU studies' corpus (nothing is redistributed:
# it is rebuilt on the machine that trains).
CORPUS_PACKAGES = ("torch", "transformers", "jax", "scipy", "sympy", "sklearn", "pandas", "numpy", "matplotlib")


def corpus_dirs(packages: tuple[str, ...] = CORPUS_PACKAGES) -> list[str]:
    """The installed directories of `packages` (those present), sorted, so that a machine with the
    same packages tokenizes the same files in the same order."""
    return sorted({str(Path(root) / pkg) for root in site.getsitepackages() for pkg in packages
                   if (Path(root) / pkg).is_dir()})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_val_loss(rows: list[dict], path: Path, title: str) -> None:
    """Validation curves (`val_curve`: [[step, loss], ...]), whole run and second half side by side;
    local-update runs (`outer_steps` > 0) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, tail) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    steps = max(step for row in rows for step, _ in row["val_curve"])
    for row, color in zip(rows, colors):
        xs, ys = zip(*row["val_curve"])
        style = "--" if row["outer_steps"] else "-"
        for ax in (full, tail):
            ax.plot(xs, ys, style, marker=".", color=color, label=row["label"])
    late = [loss for row in rows for step, loss in row["val_curve"] if step >= steps / 2]
    tail.set_xlim(steps / 2 - 8, steps + 8)
    tail.set_ylim(min(late) - 0.02, max(late) + 0.02)
    full.set_title(title)
    tail.set_title("second half")
    for ax in (full, tail):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    full.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class StudyError(Exception):
    """A user mistake or a refused input: one line on stderr, exit code 2."""


class StudyRun(Protocol):
    """What the machinery needs of one run of a study."""

    @property
    def name(self) -> str: ...  # its directory under --runs-dir

    @property
    def steps(self) -> int: ...  # its last step: done once metrics.jsonl has a validation loss there

    @property
    def world(self) -> int: ...  # virtual ranks; the time per sequence alone is estimated per world size

    @property
    def batch_size(self) -> int: ...  # sequences per step (steps x batch_size: the run's work)

    def argv(self, data: Path, runs_dir: Path, train_cmd: list[str]) -> list[str]: ...  # its exact command

    def provenance(self, data: dict[str, Any]) -> dict[str, Any]: ...  # provenance.json before any segment


def rel(path: Path) -> str:
    """A path as the commands write it: relative to the repository root (their working directory)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_json(path: Path, value: Any) -> None:
    """Write atomically: a call cut short never leaves half a file for the next one to read."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ run state


def final_val_loss(records: list[dict], steps: int) -> float | None:
    """The validation loss at the run's last step (after the LR schedule's end), or None if not reached."""
    last = [r for r in records if r.get("step") == steps and "val_loss" in r]
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


def last_step(run_dir: Path) -> int:
    """The last step in a run's metrics.jsonl, else 0."""
    records = read_metrics(run_dir)
    return int(records[-1]["step"]) if records else 0


def status(run_dir: Path, steps: int) -> str:
    """done | partial (step N, resumes from M) | pending, for a run of `steps` steps."""
    records = read_metrics(run_dir)
    if final_val_loss(records, steps) is not None:
        return "done"
    if records:
        return f"partial (step {records[-1]['step']}, resumes from {newest_checkpoint_step(run_dir)})"
    return "pending"


def run_status(run: StudyRun, runs_dir: Path, done_dirs: list[Path]) -> str:
    """The run's status in runs_dir, or `done (earlier call)` when one of done_dirs holds it finished."""
    if any(status(d / run.name, run.steps) == "done" for d in done_dirs):
        return "done (earlier call)"
    return status(runs_dir / run.name, run.steps)


def read_provenance(run_dir: Path) -> dict | None:
    path = run_dir / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pick(runs: list, only: str | None, known: list | None = None) -> list:
    """`runs`, or with --only the named runs of `known` (default: runs), in the order named."""
    if not only:
        return runs
    by_name = {r.name: r for r in (runs if known is None else known)}
    names = only.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise StudyError(f"--only: unknown run(s) {', '.join(unknown)}; `plan` lists them")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StudyError(f"--only names {', '.join(twice)} more than once (each run trains into one directory)")
    return [by_name[n] for n in names]


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


def _code_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (path, content) of halfbyte's .py files, in path order."""
    digest = hashlib.sha256()
    for name, content in sorted(files, key=lambda f: PurePosixPath(f[0])):
        digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:16]


def code_version(root: Path = ROOT) -> dict[str, Any]:
    """A sha256 over halfbyte/**/*.py (path and content): the code that trained, committed or not; and
    the git commit where `root` is a repository, `halfbyte_dirty` saying whether that code differs
    from the commit's. Contents are compared, not git's status: the GPU machine's copy of the tree
    carries a .git whose index did not follow the files (it recorded a later tree as its first
    commit, clean)."""
    tree = [(str(path.relative_to(root)), path.read_bytes()) for path in (root / "halfbyte").rglob("*.py")]
    code_sha = _code_digest(tree)
    commit = dirty = None
    try:
        def git(*args: str) -> bytes:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout

        commit = git("rev-parse", "HEAD").decode().strip()
        names = [n for n in git("ls-tree", "-r", "--name-only", "HEAD", "--", "halfbyte").decode().splitlines()
                 if n.endswith(".py")]
        dirty = _code_digest((n, git("show", f"HEAD:{n}")) for n in names) != code_sha
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"commit": commit, "halfbyte_dirty": dirty, "code_sha": code_sha}


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


# ----------------------------------------------------------------------------------------- run


def events(steps: int, eval_every: int, save_every: int, a: int, b: int) -> dict[str, int]:
    """The evaluations and checkpoint saves of a run of `steps` steps between its metrics rows of steps
    a and b (a < b), or ahead of its row of a with b = steps. halfbyte train evaluates at every
    eval_every-th step and the last (0: only the last) before writing that step's row, and saves at
    every save_every-th step after writing it (the last step's save comes after the run is done)."""
    evals = (b // eval_every - a // eval_every if eval_every else 0) + (a < steps <= b and not (
        eval_every and steps % eval_every == 0))
    saves = (b - 1) // save_every - max(a - 1, 0) // save_every if save_every else 0
    return {"eval": int(evals), "save": saves}


@dataclass
class Window:
    """A run's rate measurement under the current sharing, from its metrics row of `step` on, gap by
    gap between the rows it saw: the wall time and steps of the gaps that held training only, and per
    kind ("eval", "save") of those that held events of that kind only, with how many. Evaluations and
    saves come in lumps (one every 128 steps of a 1024-step run, ~5 s against ~5.3 s per 16 steps with
    8 runs sharing): charged to a window of 48 steps they made a rate ~20-25% slow. Apart, the
    training rate and each event's cost are measured without bias, whatever the window holds."""

    step: int
    train: list[float] = field(default_factory=lambda: [0.0, 0])  # wall s, steps
    lumps: dict[str, list[float]] = field(default_factory=dict)  # kind -> [wall s, steps, events]

    def add(self, wall_s: float, steps: int, held: dict[str, int]) -> None:
        kinds = {kind: n for kind, n in held.items() if n}
        if not kinds:
            self.train[0] += wall_s
            self.train[1] += steps
        elif len(kinds) == 1:  # a gap holding both kinds (rows unseen between them) tells neither apart
            ((kind, n),) = kinds.items()
            lump = self.lumps.setdefault(kind, [0.0, 0, 0])
            lump[0], lump[1], lump[2] = lump[0] + wall_s, lump[1] + steps, lump[2] + n

    def step_s(self) -> float | None:
        """Wall seconds per training step (None until a gap of training alone was seen)."""
        return self.train[0] / self.train[1] if self.train[1] and self.train[0] > 0 else None

    def costs(self) -> dict[str, float]:
        """Each kind's cost in training steps: its gaps' wall time less their steps' training, per event.
        In steps, not seconds, so that it holds under another sharing (an evaluation slows as a step does)."""
        rate = self.step_s()
        return {} if rate is None else {kind: max(0.0, wall - steps * rate) / n / rate
                                        for kind, (wall, steps, n) in self.lumps.items()}


@dataclass
class Child:
    run: StudyRun
    proc: subprocess.Popen
    started_s: float
    from_step: int
    log: IO[str]
    segment: int  # index into the run's provenance segments
    window: Window | None = None  # its current rate measurement
    step: int = 0  # the last step seen in its metrics.jsonl
    shed: bool = False  # stopped early so that the runs before it finish in this call
    shared_s: float = 0.0  # the integral over its life of how many runs shared the GPU (run-seconds)
    eval_every: int = 0  # its --train.eval_interval (0: only at the last step)
    save_every: int = 0  # its --train.checkpoint_interval (0: only at the end)
    written_s: float = 0.0  # when its row of `step` was written (metrics.jsonl's mtime, on the launcher's clock)
    costs: dict[str, float] = field(default_factory=dict)  # "eval" / "save" -> training steps, latest measured


def fits(estimate_s: float | None, remaining_fraction: float, now_s: float, stop_s: float) -> bool:
    """Whether a run should start now: yes without an estimate (the first wave of a call), else only if
    it is predicted to end before the stop. A run cut at the stop resumes only while the machine keeps
    its checkpoints (back-to-back calls); on a fresh machine it would start over."""
    return estimate_s is None or now_s + GATE_SAFETY * estimate_s * remaining_fraction <= stop_s


def solo_s(wall_s: float, shared_s: float, work: int) -> float:
    """The time alone on the GPU per unit of work (a sequence: a step of a batch of one) from a segment
    that did `work` units in wall_s while shared_s/wall_s runs shared the GPU on average (even sharing,
    the model keep_count also uses)."""
    return wall_s / work / max(1.0, shared_s / wall_s)


def keep_count(remaining_s: list[float], time_left_s: float, others: int = 0) -> int:
    """How many of k runs sharing the GPU (priority order; remaining_s[i]: run i's time to its end at
    the current sharing) to keep so that every kept run ends within time_left_s, if the GPU's work is
    shared evenly (keeping k' of k, beside `others` runs of other launchers, makes each
    (k + others) / (k' + others) times faster). All k when not even the first could
    end in time alone: shedding would buy nothing in this call, and a back-to-back call resumes them.
    Each kept run is taken to share the GPU with all the others to its end: a run that ends first
    speeds up the rest, so the check errs on the safe side when the remaining times differ."""
    k = len(remaining_s)
    for keep in range(k, 0, -1):
        if all(GATE_SAFETY * r * (keep + others) / (k + others) <= time_left_s for r in remaining_s[:keep]):
            return keep
    return k


def shed_line(now_s: float, remaining_s: list[float], stop_s: float, shed: list[str]) -> str:
    """The log line of a shed, with the numbers keep_count compared: the slowest run's remaining time
    times GATE_SAFETY against the time left before the stop."""
    return (f"{now_s:6.0f} s  {len(remaining_s)} runs would end {max(remaining_s):.0f} s from now, "
            f"{GATE_SAFETY * max(remaining_s):.0f} s with the {GATE_SAFETY:g} margin, against "
            f"{stop_s - now_s:.0f} s left before the stop at {stop_s:.0f} s: shed {', '.join(shed)}")


class Peers:
    """The launchers sharing this GPU, through a directory where each keeps a file <pid>.json with its
    number of live runs (two studies side by side, one launcher each). Without it a launcher counted
    only its own runs as sharing the GPU: a run's time alone, measured beside another launcher's
    runs, came out as slow as the GPU was shared, so once those ended its gate refused runs that fit,
    and a launcher left with only refused runs exited. Files of launchers no longer alive are left out."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.mine, self.live = directory, directory / f"{os.getpid()}.json", -1

    def publish(self, live: int) -> None:
        if live != self.live:
            write_json(self.mine, {"live": live})
            self.live = live

    def others(self) -> int:
        """The live runs of the other launchers."""
        total = 0
        for path in self.dir.glob("*.json"):
            if path == self.mine or not path.stem.isdigit():
                continue
            try:
                os.kill(int(path.stem), 0)
            except ProcessLookupError:
                continue  # an ended launcher shares nothing
            except PermissionError:
                pass  # alive, another user's
            try:
                total += int(json.loads(path.read_text())["live"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue  # removed as it ended, or not a launcher's file
        return total

    def close(self) -> None:
        self.mine.unlink(missing_ok=True)


def requeue(resumed: list, pending: list, priority: dict[str, int]) -> list:
    """Shed runs that ended go back ahead of the runs not started, in priority order among
    themselves (whatever order they ended in): shedding goes by start order, so the earlier run must
    start earlier again."""
    return sorted(resumed, key=lambda r: priority[r.name]) + pending


class Launcher:
    """Runs a list of runs as subprocesses, --parallel at a time, until done or the deadline; everything
    that differs between runs (steps, batch, command, provenance) comes from the run (StudyRun).

    Once every run has advanced MIN_RATE_SHARE of its own steps under the current sharing, their rates
    predict their ends (`predict`: its remaining steps at its training rate, plus the evaluations and
    checkpoint saves still ahead at their measured cost, none of which is charged to the rate; none
    predicted before an evaluation's cost was measured in this call); if some would end after the stop,
    the last-started ones are stopped (`shed`, resumable) so that the others finish: on a fresh machine
    a run cut at the stop is lost, a finished one is not. The shed order is the start order and only
    that: the runs start in the study's priority order, so the last-started go first, whatever their
    lengths (a run of fewer steps started last is shed before a longer one started earlier). While a
    run kept at a shed runs, nothing starts; then the shed ones resume first, from their SIGTERM
    checkpoint. A run starts only if it is predicted to end before the stop: its work (steps x batch)
    times the slowest time per sequence alone of the runs of its world size finished in this call,
    times the runs it would share the GPU with (no estimate yet: it starts). A refused run waits and is
    looked at again after each end of a run, as ending runs free the GPU. The runs sharing the GPU
    include other launchers' (`Peers`: two studies side by side, one launcher each).

    With warm_next (the next call follows at once on this machine, which keeps the runs' checkpoints)
    neither the start gate nor shedding applies: every slot stays busy to the stop, and the runs cut
    there resume in the next call. Gated, the GPU ran one or two runs at ~40% for the last 150-180 s of
    each 530 s call (2026-12-03).

    With snapshot_path, the runs (without checkpoints) are written there as a tarball after every
    segment's end (`snapshot`): a call killed at its limit before its own closing `tar` still returns
    every run that ended in it."""

    def __init__(self, runs_dir: Path, data: Path, train_cmd: list[str], parallel: int, deadline_s: float,
                 stop_margin_s: float, poll_s: float, warm_next: bool = False,
                 snapshot_path: Path | None = None, peers_dir: Path | None = None) -> None:
        self.runs_dir, self.data, self.train_cmd = runs_dir, data, train_cmd
        self.peers = Peers(peers_dir) if peers_dir else None
        self.warm_next, self.snapshot_path = warm_next, snapshot_path
        from halfbyte.train.config import parse_args  # imports torch (~2 s): before the clock starts

        self.parse_train = parse_args
        self.parallel, self.deadline_s, self.stop_s = parallel, deadline_s, deadline_s - stop_margin_s
        self.poll_s = poll_s
        self.identity = data_identity(data)
        self.code, self.device, self.host = code_version(), device_name(), socket.gethostname()
        self.solo_seq_s: dict[int, float] = {}  # W -> the slowest time per sequence alone of runs ended here
        self.kept: set[str] = set()  # the runs kept at a shed: no run starts while one of them runs
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def others(self) -> int:
        """Runs of other launchers on this GPU (0 without a peers directory)."""
        return self.peers.others() if self.peers else 0

    def estimate(self, run: StudyRun, sharing: int) -> float | None:
        """A full run's predicted time when `sharing` runs share the GPU (even sharing; the rates
        measured once it runs correct a wrong guess by shedding the last-started runs)."""
        solo = self.solo_seq_s.get(run.world)
        return None if solo is None else solo * run.steps * run.batch_size * sharing

    def start(self, run: StudyRun, from_step: int) -> Child:
        run_dir = self.runs_dir / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = run.argv(self.data, self.runs_dir, self.train_cmd)
        provenance = read_provenance(run_dir) or {**run.provenance(self.identity), "segments": []}
        provenance["segments"].append({"start_utc": utc_now(), "from_step": from_step, "command": argv,
                                       **self.code, "host": self.host, "device": self.device})
        write_json(run_dir / "provenance.json", provenance)
        commands = {json.dumps(s["command"]) for s in provenance["segments"]}
        (run_dir / "command.txt").write_text("".join(shlex.join(json.loads(c)) + "\n" for c in sorted(commands)))
        log = open(run_dir / "train.log", "a")  # noqa: SIM115 (the child's log, closed in end())
        log.write(f"=== {utc_now()} segment {len(provenance['segments'])}, from step {from_step}: "
                  f"{shlex.join(argv)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        print(f"{self.now():6.0f} s  start {run.name} (from step {from_step})", flush=True)
        train = self.parse_train(argv[len(self.train_cmd):]).train  # when it evaluates and saves, as halfbyte reads it
        return Child(run, proc, self.now(), from_step, log, len(provenance["segments"]) - 1, step=from_step,
                     eval_every=train.eval_interval, save_every=train.checkpoint_interval)

    def end(self, child: Child, stopping: bool) -> str:
        """Record how a segment ended; returns the run's status (`failed (exit N): ...` for a run that
        exited non-zero unasked)."""
        child.log.close()
        run, run_dir = child.run, self.runs_dir / child.run.name
        wall = self.now() - child.started_s
        state, code = status(run_dir, run.steps), child.proc.returncode
        stopped = None if state == "done" else "shed" if child.shed else "deadline" if stopping else None
        provenance = read_provenance(run_dir)
        provenance["segments"][child.segment] |= {"end_utc": utc_now(), "exit_code": code, "wall_s": round(wall, 1),
                                                  "to_step": last_step(run_dir), "stopped": stopped}
        write_json(run_dir / "provenance.json", provenance)
        if state == "done" and run.steps > child.from_step and wall > 0:
            solo = solo_s(wall, child.shared_s, (run.steps - child.from_step) * run.batch_size)
            self.solo_seq_s[run.world] = max(self.solo_seq_s.get(run.world, 0.0), solo)
        if code != 0 and stopped is None:
            state = f"failed (exit {code}): {state}"
        elif stopped:
            state += f", stopped ({stopped})"
        print(f"{self.now():6.0f} s  {run.name}: exit {code}, {state}, {wall:.0f} s this call", flush=True)
        if state.startswith("failed"):
            tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-6:]
            print(f"--- {run.name}: end of its train.log:", *tail, sep="\n", flush=True)
        return state

    def observe(self, c: Child, now: float) -> None:
        """Read the run's newest metrics row; a new one adds the gap since the last one seen to its
        window (or opens one). Rows are timed by metrics.jsonl's mtime (the trainer flushes each row),
        not by the poll that saw them: a poll comes up to a log interval (~5 s) after the row."""
        path = self.runs_dir / c.run.name / "metrics.jsonl"
        try:  # before the read: a row written in between is timed a row early, never late
            written = now - (time.time() - path.stat().st_mtime)
        except FileNotFoundError:
            written = now
        step = last_step(path.parent)
        if step == c.step:
            return
        if step < c.step:
            c.window = None  # the window opened on records the resumed trainer has since trimmed
        elif c.window is not None:
            c.window.add(written - c.written_s, step - c.step,
                         events(c.run.steps, c.eval_every, c.save_every, c.step, step))
        elif step > c.from_step:
            c.window = Window(step)
        c.step, c.written_s = step, written

    def predict(self, live: list[Child], now: float) -> list[float] | None:
        """Each run's time to its end: (its remaining steps + the evaluations and saves ahead x their
        cost in steps) x its wall time per training step, less the time since its newest row. A cost is
        the run's own latest measurement, else the largest among the runs sharing the GPU (runs of one
        study evaluate alike; the largest errs towards shedding); a save not measured yet costs an
        evaluation (saves cost less, ~1-2 s against ~5 s: on the safe side too). None (no shed yet)
        while a run has no training rate, or events ahead of no measured cost: a shed is irreversible,
        so what decides it is measured, not guessed."""
        for c in live:
            c.costs |= c.window.costs()

        def cost(c: Child, kind: str) -> float | None:
            if kind in c.costs:
                return c.costs[kind]
            return max((d.costs[kind] for d in live if kind in d.costs), default=None)

        remaining = []
        for c in live:
            rate, ahead = c.window.step_s(), events(c.run.steps, c.eval_every, c.save_every, c.step, c.run.steps)
            eval_cost = cost(c, "eval")
            save_cost = cost(c, "save")
            lumps = [(ahead["eval"], eval_cost), (ahead["save"], eval_cost if save_cost is None else save_cost)]
            if rate is None or any(n and x is None for n, x in lumps):
                return None
            steps = c.run.steps - c.step + sum(n * x for n, x in lumps if n)
            remaining.append(max(0.0, steps * rate - (now - c.written_s)))
        return remaining

    def shed_late(self, running: list[Child], now: float, others: int = 0) -> None:
        """Measure each live run's rate since its window opened; shed runs if not all can end in time."""
        live = [c for c in running if not c.shed]
        for c in live:
            self.observe(c, now)
        if not live or any(c.window is None or c.step - c.window.step < MIN_RATE_SHARE * c.run.steps for c in live):
            return
        remaining = self.predict(live, now)
        if remaining is None:
            return
        keep = keep_count(remaining, self.stop_s - now, others)
        if keep == len(live):
            return
        self.kept = {c.run.name for c in live[:keep]}
        for c in live[keep:]:
            c.shed = True
            c.proc.send_signal(signal.SIGTERM)
        for c in live[:keep]:
            c.window = None  # faster now: measure again
        print(shed_line(now, remaining, self.stop_s, [c.run.name for c in live[keep:]]), flush=True)

    def execute(self, runs: list[StudyRun]) -> dict[str, str]:
        """Run `runs` (none done); returns each one's status at the end of the call."""
        try:
            return self._execute(runs)
        finally:
            if self.peers:
                self.peers.close()

    def _execute(self, runs: list[StudyRun]) -> dict[str, str]:
        pending, running, outcome, stopping = list(runs), [], {}, False
        refused: set[str] = set()  # pending runs the start gate refused at their last look
        looked = False  # whether the pending runs were looked at yet
        priority = {run.name: i for i, run in enumerate(runs)}
        last_poll, others = self.now(), self.others()
        while pending or running:
            now, was = self.now(), others
            others = self.others()
            for child in running:
                child.shared_s += (now - last_poll) * (len(running) + was)
            last_poll = now
            sharing_changed = others != was  # another launcher's run started or ended
            ended = [c for c in running if c.proc.poll() is not None]
            resumed = []
            for child in ended:
                running.remove(child)
                outcome[child.run.name] = self.end(child, stopping)
                if child.shed and not stopping and status(self.runs_dir / child.run.name, child.run.steps) != "done":
                    resumed.append(child.run)  # resumes from its checkpoint once the kept runs end
            pending = requeue(resumed, pending, priority)
            if ended and self.snapshot_path:
                snapshot(self.runs_dir, self.snapshot_path)
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
            # a run refused stays pending: only an ending run (a freed slot, a new estimate; another
            # launcher's too) can make it fit, so the pending runs are looked at on the first poll and
            # after each end
            if not stopping and not protecting and (ended or not looked or others < was):
                looked = True
                for run in list(pending):
                    if len(running) == self.parallel:
                        break
                    from_step = newest_checkpoint_step(self.runs_dir / run.name)
                    remaining_fraction = (run.steps - from_step) / run.steps
                    if self.warm_next or fits(self.estimate(run, len(running) + 1 + others), remaining_fraction,
                                              now, self.stop_s):
                        pending.remove(run)
                        running.append(self.start(run, from_step))
                        started += 1
                    else:
                        refused.add(run.name)
                if not running and not others:  # alone on the GPU it would not fit either
                    break
            if self.peers:
                self.peers.publish(len(running))
            if ended or started or sharing_changed:
                for child in running:
                    child.window = None  # the sharing changed: rates are measured again
            if not stopping and not self.warm_next:
                self.shed_late(running, now, others)
            time.sleep(self.poll_s)
        if self.snapshot_path:  # the runs killed at the deadline ended after the last snapshot
            snapshot(self.runs_dir, self.snapshot_path)
        for run in pending:  # a shed run that no longer fits keeps its "stopped (shed)"
            outcome.setdefault(run.name, "not started: predicted to end after the stop" if run.name in refused
                               else "not started: deadline")
        return outcome


def snapshot(runs_dir: Path, path: Path) -> None:
    """Write runs_dir's runs without their checkpoints and TensorBoard events as a gzipped tarball at
    `path`, whole or not at all (a new file renamed over the last). A file that changes while it is
    read (a resumed run rewriting its metrics) leaves the last snapshot in place; the next end writes one."""
    tmp = path.with_name(path.name + ".tmp")
    skip = {"checkpoints", "tensorboard"}
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
                tar.add(run_dir, arcname=run_dir.name,
                        filter=lambda m: None if skip & set(PurePosixPath(m.name).parts) else m)
    except (OSError, tarfile.TarError) as e:
        tmp.unlink(missing_ok=True)
        print(f"snapshot {path} not rewritten this time: {e}", flush=True)
        return
    os.replace(tmp, path)


def print_commands(script: str, runs: list[StudyRun], data: Path, runs_dir: Path) -> None:
    """`plan`'s last part: the data's command, then every run's."""
    print("\n# data (cached):")
    print(shlex.join(["python3", script, "prepare", "--data", rel(data)]))
    print("# each run (what `run` starts):")
    for run in runs:
        print(shlex.join(run.argv(data, runs_dir, ["python3", "-m", "halfbyte", "train"])))


# ---------------------------------------------------------------------------------------- report


@dataclass
class Record:
    """A run found by `report`: its directory, provenance and metrics."""

    run: StudyRun
    dir: Path
    provenance: dict
    metrics: list[dict]

    @property
    def final(self) -> float | None:
        return final_val_loss(self.metrics, self.run.steps)


def first_difference(a: dict, b: dict) -> str | None:
    """The first key (in sorted order) whose value differs between two designs, or None if they agree."""
    return next((k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), None)


def check_data_and_code(records: list[Record], same_commit: bool) -> None:
    """One data set (and with same_commit one code version) for every run, or StudyError naming the
    first difference."""
    first = records[0]
    for r in records[1:]:
        a, b = first.provenance["data"], r.provenance["data"]
        for key in ("train_sha256", "val_sha256"):
            if a[key] != b[key]:
                raise StudyError(f"runs differ in their data: {key} {a[key][:12]} in {first.run.name}, "
                                 f"{b[key][:12]} in {r.run.name}; report only runs of one data set")
    if same_commit:
        versions = {(s["code_sha"], s["commit"]): r.run.name for r in records for s in r.provenance["segments"]}
        if len(versions) > 1:
            (v1, n1), (v2, n2) = list(versions.items())[:2]
            raise StudyError(f"--same-commit: runs were made with different code (code_sha {v1[0]}, commit "
                             f"{v1[1]} in {n1}; code_sha {v2[0]}, commit {v2[1]} in {n2})")


def report_runs(records: list[Record], out: Path, planned: set[str]) -> tuple[list[Record], dict, dict]:
    """`report`'s part on the runs themselves: the finished ones (StudyError if none), their
    metrics.jsonl, command.txt and provenance.json copied to out/<run>/, and two sets of summary.json
    fields: the code versions and devices they recorded; the runs unfinished and those of `planned`
    not started."""
    finished = [r for r in records if r.final is not None]
    if not finished:
        raise StudyError("no run has reached its last step; nothing to report yet")
    out.mkdir(parents=True, exist_ok=True)
    for r in finished:
        (out / r.run.name).mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "command.txt", "provenance.json"):
            (out / r.run.name / name).write_bytes((r.dir / name).read_bytes())
    segments = [s for r in finished for s in r.provenance["segments"]]
    versions = {"code_versions": sorted({f"{s['code_sha']} (commit {s['commit']})" for s in segments}),
                "devices": sorted({s["device"] for s in segments})}
    names = {r.run.name for r in records}
    progress = {"unfinished": sorted(names - {r.run.name for r in finished}), "not_started": sorted(planned - names)}
    return finished, versions, progress


# ------------------------------------------------------------------------------------------ main


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def study_parser(prog: str, doc: str, prepare_help: str, data: Path, runs_dir: Path, done_dirs: list[Path],
                 results: Path, seeds: int) -> tuple[Parser, dict[str, argparse.ArgumentParser]]:
    """The verbs both studies have (prepare, plan, run, report) with the options they share; returns
    the parser and the verbs' parsers, for each study's own options (report's --runs-dir among them)."""
    parser = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    verbs = {"prepare": sub.add_parser("prepare", help=prepare_help)}
    verbs["prepare"].add_argument("--data", default=rel(data), help="token file to write (default: %(default)s)")
    verbs["prepare"].add_argument("--inputs", nargs="+",
                                  help="directories of *.py files (default: the installed corpus packages)")
    for verb in ("plan", "run"):
        p = verbs[verb] = sub.add_parser(verb, help={"plan": "print the grid, each run's status and its command",
                                                     "run": "run unfinished runs until done or --deadline-s"}[verb])
        p.add_argument("--runs-dir", default=rel(runs_dir), help="one directory per run (default: %(default)s)")
        p.add_argument("--done-in", nargs="+", default=[rel(d) for d in done_dirs],
                       help="earlier calls' run directories: runs finished there are skipped (default: %(default)s)")
        p.add_argument("--data", default=rel(data), help="token file from `prepare` (default: %(default)s)")
        p.add_argument("--seeds", type=int, default=seeds, help="seeds 0..N-1 per arm (default: %(default)s)")
        p.add_argument("--only", help="comma-separated run names (default: the grid, in its order)")
    p = verbs["run"]
    p.add_argument("--deadline-s", type=float, required=True, help="every run has exited by then")
    p.add_argument("--parallel", type=int, default=8, help="runs side by side (default: %(default)s)")
    p.add_argument("--stop-margin-s", type=float, default=40.0,
                   help="SIGTERM this long before the deadline (default: %(default)s)")
    p.add_argument("--warm-next", action="store_true",
                   help="the next call follows at once on this machine (it keeps runs/): start runs and keep "
                        "them to the stop even if they cannot end before it, shed none; they resume in the "
                        "next call. Leave it off for a session's last call: a fresh machine starts cut runs over")
    p.add_argument("--train-cmd", default=shlex.join([sys.executable, "-m", "halfbyte", "train"]),
                   help="the trainer, followed by the run's options (default: %(default)s)")
    p.add_argument("--snapshot", metavar="TGZ",
                   help="after every run's segment ends, write the runs (without checkpoints and TensorBoard "
                        "events) as a gzipped tarball here, replacing the last one: write it under $OUT, and a "
                        "call killed at its limit still returns every run that ended before")
    p.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    p = verbs["report"] = sub.add_parser("report", help="paired statistics, figure and per-run files under "
                                         "benchmarks/results/")
    p.add_argument("--out", default=rel(results), help="results directory (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=seeds, help="seeds planned per arm (default: %(default)s)")
    p.add_argument("--same-commit", action="store_true", help="refuse runs made with different code")
    return parser, verbs


def dispatch(parser: Parser, argv: list[str] | None, commands: dict[str, Any]) -> int:
    """Parse argv and run its verb; a StudyError is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    if getattr(args, "seeds", 1) < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        return commands[args.verb](args)
    except StudyError as e:
        print(f"{parser.prog} {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `plan | head`: the reader has what it wanted; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
