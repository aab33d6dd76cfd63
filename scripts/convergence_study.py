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

    source scripts/mps.sh start                                   # MPS: the runs share the GPU
    python3 scripts/convergence_study.py prepare                  # corpus -> runs/convergence-data/ (cached)
    python3 scripts/convergence_study.py run --deadline-s 540 --parallel 6 --snapshot $OUT/runs.tgz

`run` starts the unfinished runs of the grid (in priority order, --parallel at a time, each one
`halfbyte train ... --resume auto`) in runs/convergence/, watches their rates and, if not all of them
can end before the deadline, stops the last-started ones early so that the others do (a run cut at
the deadline is lost on a fresh machine; only back-to-back calls keep checkpoints). No run starts
while the kept ones run; after them the shed ones resume first (from the checkpoint SIGTERM saved).
It starts no run that cannot end in time by the runs finished in this call (their time alone per
sequence, times the run's steps x batch and the runs it would share the GPU with), sends SIGTERM
--stop-margin-s before the deadline (halfbyte train saves a checkpoint and exits), and the next call
resumes what was stopped. With --warm-next (a call followed at once by another on the same warm
machine) it neither gates nor sheds: every slot stays busy to the stop. The launcher is
study_common.Launcher, shared with local_updates_study.py.
Runs finished in earlier calls are skipped if their directories are in runs/convergence-done/ (the
calls' runs.tgz unpacked here and carried there: a separate directory, so that carrying it never
replaces a warm machine's checkpoints), or committed by `report` under benchmarks/results/convergence-21m/
(a fresh checkout has no runs/). A run directory holds metrics.jsonl, train.log, command.txt
and provenance.json (design, data size and sha256, code version, start and end of every segment).

`--peak-lr LR` (plan, run, report) is the same study at another peak lr (the final lr a tenth of it):
a study of its own, in directories with -lr<LR> appended (runs/convergence-lr5e-4/, ...), whose runs
never pair with the default's; docs/convergence.md's pilot runs it at 5e-4.

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
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# halfbyte from this checkout, also where it is not installed (the GPU machine)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# scripts/ is on sys.path when a script runs, so its shared module imports by name; the run machinery
# (run state, provenance, the Launcher) is there, shared with local_updates_study.py
from study_common import (  # noqa: E402
    ROOT, Launcher, Record, StudyError, check_data_and_code, corpus_dirs, dispatch, first_difference, pick,
    print_commands,
    read_metrics, read_provenance, rel, report_runs, run_status, study_parser, write_json,
)

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
PEAK_LR = DESIGN["--lr"]  # the study's; --peak-lr makes a study of its own at another (a pilot at a lower lr)
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


def lr_text(value: float) -> str:
    """A learning rate as the design writes it: mantissa and exponent, no padding (1.5e-3, 5e-4)."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def design_at(peak_lr: str) -> dict[str, str]:
    """The study's DESIGN at another peak learning rate, decaying to a tenth of it as the study's does
    (at PEAK_LR, DESIGN text for text: lr_text writes the recorded 1.5e-3 and 1.5e-4)."""
    return DESIGN | {"--lr": peak_lr, "--schedule.min_lr": lr_text(float(peak_lr) / 10)}


def peak_lr_arg(text: str) -> str:
    """--peak-lr's type: a positive, finite learning rate, in the design's notation."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, got '{text}'")
    return lr_text(value)


def at_peak_lr(path: Path, peak_lr: str) -> Path:
    """The directory of the study at peak_lr: the default's name with -lr<LR> appended (another study)."""
    return path if peak_lr == PEAK_LR else path.with_name(f"{path.name}-lr{peak_lr}")


@dataclass(frozen=True)
class Run:
    """One run of the grid; what study_common's Launcher asks of it (a StudyRun) is here too."""

    arm: str
    world: int
    seed: int
    peak_lr: str = PEAK_LR

    @property
    def name(self) -> str:
        return f"{self.arm}-w{self.world}-seed{self.seed}"

    @property
    def gpus_per_node(self) -> int:
        return LAYOUT[self.world]

    steps, batch_size = STEPS, BATCH  # every run's

    @property
    def design(self) -> dict[str, str]:
        return design_at(self.peak_lr)

    def argv(self, data: Path, runs_dir: Path, train_cmd: list[str]) -> list[str]:
        """The exact command of the run. Only --seed, --virtual-ranks / --virtual-gpus-per-node /
        micro-batch, --preset and the names differ between runs."""
        design = [x for kv in self.design.items() for x in kv]
        return [*train_cmd, *design, *OUTPUT_ARGS, "--data", rel(data), "--seed", str(self.seed),
                "--virtual-ranks", str(self.world), "--virtual-gpus-per-node", str(self.gpus_per_node),
                "--train.micro_batch_size", str(BATCH // self.world), "--preset", self.arm,
                "--train.name", self.name, "--out", rel(runs_dir / self.name), "--resume", "auto"]

    def provenance(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"run": self.name, "arm": self.arm, "world": self.world, "gpus_per_node": self.gpus_per_node,
                "nodes": self.world // self.gpus_per_node, "seed": self.seed, "design": self.design, "data": data,
                "output_args": list(OUTPUT_ARGS)}


def grid(seeds: int = SEEDS, peak_lr: str = PEAK_LR) -> list[Run]:
    """Every run, in the order they are started: the W=8 core arms seed by seed (so a call's first
    wave already pairs every arm with its baseline), then W=32, then the single-technique arms."""
    core = [Run(arm, 8, s, peak_lr) for s in range(seeds) for arm in ("baseline", "sdp4bit", "qw4", "zeropp")]
    wide = [Run(arm, 32, s, peak_lr) for s in range(seeds) for arm in ("baseline", "sdp4bit")]
    parts = [Run(arm, 8, s, peak_lr) for s in range(seeds) for arm in ("qwd", "tlq-hs")]
    return core + wide + parts


def gpt_params(n_layer: int = N_LAYER, d_model: int = D_MODEL, vocab: int = VOCAB) -> int:
    """Parameters of halfbyte's GPT (tied embedding, bias-free linears and LayerNorms, RoPE)."""
    return 12 * n_layer * d_model ** 2 + vocab * d_model + (2 * n_layer + 1) * d_model


# ------------------------------------------------------------------------------------ provenance


def recorded_design(provenance: dict) -> dict[str, str]:
    """A run's recorded design, with the keys added later at the value it trained with."""
    return {**DESIGN_ADDED_LATER, **provenance["design"]}


def check_recorded(run: Any, recorded: dict | None, data: dict[str, Any], run_dir: Path) -> None:
    """Refuse to continue (or count as done) a run that was started with another design (than
    run.design) or data: it could not be paired."""
    if (run_dir / "metrics.jsonl").is_file() and recorded is None:
        raise StudyError(f"{rel(run_dir)} holds a run without provenance.json (not made by this script); "
                         "move it away or choose another --runs-dir")
    if recorded is None:
        return
    design, ours = recorded_design(recorded), run.design
    key = first_difference(ours, design)
    if key is not None:
        raise StudyError(f"{rel(run_dir)} was started with {key} {design.get(key)}, this design has "
                         f"{ours.get(key)}; move it away or choose another --runs-dir")
    for key in ("train_sha256", "val_sha256"):
        if recorded["data"][key] != data[key]:
            raise StudyError(f"{rel(run_dir)} was trained on other data ({key} {recorded['data'][key][:12]}, "
                             f"now {data[key][:12]}); move it away or choose another --runs-dir")


# ----------------------------------------------------------------------------------------- run


def select(args: argparse.Namespace) -> list[Run]:
    return pick(grid(args.seeds, args.peak_lr), args.only)


def use_peak_lr_dirs(args: argparse.Namespace) -> None:
    """Under --peak-lr, the default directories become the variant's (an explicit one is kept)."""
    defaults = {rel(d): rel(at_peak_lr(d, args.peak_lr)) for d in (RUNS_DIR, DONE_DIR, RESULTS)}
    for attr in ("runs_dir", "out"):
        if hasattr(args, attr):
            setattr(args, attr, defaults.get(getattr(args, attr), getattr(args, attr)))
    if hasattr(args, "done_in"):
        args.done_in = [defaults.get(d, d) for d in args.done_in]


def cmd_run(args: argparse.Namespace) -> int:
    use_peak_lr_dirs(args)
    return run_call(args, select(args), [Path(d) for d in args.done_in])


def run_call(args: argparse.Namespace, runs: list, done_dirs: list[Path]) -> int:
    """`run` for runs of this design (both studies'): start those not done in --runs-dir or done_dirs
    with study_common's Launcher until done or --deadline-s. Refuses runs recorded with another design
    or data (StudyError)."""
    if args.parallel < 1 or args.deadline_s <= args.stop_margin_s:
        raise StudyError(f"need --parallel >= 1 and --deadline-s > --stop-margin-s ({args.stop_margin_s:g}), got "
                         f"--parallel {args.parallel} --deadline-s {args.deadline_s:g}")
    runs_dir, data = Path(args.runs_dir), Path(args.data)
    snapshot = Path(args.snapshot) if args.snapshot else None
    if snapshot and not snapshot.parent.is_dir():
        raise StudyError(f"--snapshot {args.snapshot}: no such directory {rel(snapshot.parent)}")
    launcher = Launcher(runs_dir, data, shlex.split(args.train_cmd), args.parallel, args.deadline_s,
                        args.stop_margin_s, args.poll_s, args.warm_next, snapshot,
                        peers_dir=runs_dir.parent / ".launchers")  # both studies' default run dirs: runs/
    if launcher.identity["val_tokens"] - 1 < EVAL_TOKENS:
        raise StudyError(f"{rel(data)}'s validation file has {launcher.identity['val_tokens']:,} tokens, fewer than "
                         f"the evaluation set of {EVAL_TOKENS:,}; prepare it with a larger --val-fraction")
    todo = []
    for run in runs:
        for where in (runs_dir, *done_dirs):
            check_recorded(run, read_provenance(where / run.name), launcher.identity, where / run.name)
        if run_status(run, runs_dir, done_dirs).startswith("done"):
            continue
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
    use_peak_lr_dirs(args)
    runs_dir, data = Path(args.runs_dir), Path(args.data)
    runs = select(args)
    print(f"GPT {gpt_params() / 1e6:.2f}M parameters ({N_LAYER} layers, d={D_MODEL}, {N_HEAD} heads, vocab {VOCAB}); "
          f"{STEPS} steps x {BATCH} x {SEQ_LEN} = {STEPS * BATCH * SEQ_LEN / 1e6:.1f}M tokens "
          f"({STEPS * BATCH * SEQ_LEN / gpt_params():.1f} per parameter); peak lr {args.peak_lr}; "
          f"eval {EVAL_TOKENS:,} tokens; {len(runs)} runs\n")
    print(f"{'run':<22} {'arm':<9} {'W':>3} {'layout':>6} {'seed':>4}  status")
    for run in runs:
        layout = f"{run.world // run.gpus_per_node}x{run.gpus_per_node}"
        state = run_status(run, runs_dir, [Path(d) for d in args.done_in])
        print(f"{run.name:<22} {run.arm:<9} {run.world:>3} {layout:>6} {run.seed:>4}  {state}")
    print_commands("scripts/convergence_study.py", runs, data, runs_dir)
    return 0


# ---------------------------------------------------------------------------------------- report


def collect(runs_dir: Path) -> list[Record]:
    records = []
    for path in sorted(runs_dir.glob("*/provenance.json")):
        p = json.loads(path.read_text())
        run = Run(p["arm"], p["world"], p["seed"], recorded_design(p)["--lr"])
        records.append(Record(run, path.parent, p, read_metrics(path.parent)))
    if not records:
        raise StudyError(f"no study runs (*/provenance.json) under {runs_dir}; unpack the calls' runs.tgz there")
    return records


def check_pairable(records: list[Record], same_commit: bool) -> None:
    """One design, one data set (and with same_commit one code version) for every run, or StudyError
    naming the first difference."""
    first = records[0]
    da = recorded_design(first.provenance)
    for r in records[1:]:
        db = recorded_design(r.provenance)
        key = first_difference(da, db)
        if key is not None:
            raise StudyError(f"runs differ in their design: {key} {da.get(key)} in {first.run.name}, "
                             f"{db.get(key)} in {r.run.name}; report only runs of one design")
    check_data_and_code(records, same_commit)


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


def _fmt_r(r: float | None) -> str:
    return "-" if r is None else f"{r:+.2f}"


def results_table(comparisons: dict[str, Any]) -> str:
    lines = ["| arm | W | seeds | baseline loss | gap (nats) | 95% CI (nats) | gap (% of baseline) | 95% CI (%) "
             "| pairing r | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, block in comparisons.items():
        for arm, g in block["arms"].items():
            if "pct" not in g:
                lines.append(f"| {arm} | {key[1:]} | {g['n_seeds']} | | | | | | | {g['note']} |")
                continue
            n, p = g["nats"], g["pct"]
            lines.append(f"| {arm} | {key[1:]} | {g['n_seeds']} | {g['baseline_mean']:.4f} | {n['mean']:+.4f} | "
                         f"{n['ci_low']:+.4f} .. {n['ci_high']:+.4f} | {p['mean']:+.3f}% | {p['ci_low']:+.3f} .. "
                         f"{p['ci_high']:+.3f}% | {_fmt_r(g['pairing_correlation'])} | {g['verdict']['text']} |")
    return "\n".join(lines)


README = """# Paired convergence study, GPT {params:.1f}M, peak lr {peak_lr} (issue 19)

Made by `python scripts/convergence_study.py report` from the runs listed in `summary.json` (design,
data hashes, code versions, devices, every run's final validation loss); docs/convergence.md says how
the study is designed and how to read it. Per run: `<arm>-w<W>-seed<k>/metrics.jsonl`, `command.txt`,
`provenance.json`. Figure: `convergence.png`.

{finished} of {planned} planned runs finished{unfinished}.

{table}
"""


def check_design(records: list[Record], peak_lr: str) -> None:
    """The (pairable) runs are of the design at peak_lr, or StudyError naming the option that reads them."""
    ours, first = design_at(peak_lr), records[0]
    theirs = recorded_design(first.provenance)
    if theirs == ours:
        return
    if theirs == design_at(theirs["--lr"]):
        raise StudyError(f"the runs in {rel(first.dir.parent)} were made with --lr {theirs['--lr']} (this report's "
                         f"design has {peak_lr}); pass --peak-lr {theirs['--lr']}")
    key = first_difference(ours, theirs)
    raise StudyError(f"{first.run.name} was made with {key} {theirs.get(key)}, this study's design has {ours.get(key)}")


def cmd_report(args: argparse.Namespace) -> int:
    use_peak_lr_dirs(args)
    records = collect(Path(args.runs_dir))
    check_pairable(records, args.same_commit)
    check_design(records, args.peak_lr)
    planned = {run.name for run in grid(args.seeds, args.peak_lr)}
    finished, versions, progress = report_runs(records, Path(args.out), planned)
    comparisons = compare(records, args.target_pct)
    out, first = Path(args.out), finished[0].provenance
    summary = {
        "study": "issue 19: paired multi-seed convergence, virtual ranks on one GPU",
        "model": {"params": gpt_params(), "n_layer": N_LAYER, "d_model": D_MODEL, "n_head": N_HEAD, "vocab": VOCAB},
        "tokens_per_run": STEPS * BATCH * SEQ_LEN, "design": recorded_design(first), "data": first["data"],
        "target_pct": args.target_pct, "confidence": 0.95,
        **versions, "comparisons": comparisons,
        "runs": [{"name": r.run.name, "arm": r.run.arm, "world": r.run.world, "seed": r.run.seed,
                  "final_val_loss": r.final, "segments": len(r.provenance["segments"]),
                  "train_s": r.metrics[-1].get("elapsed_s")} for r in finished],
        **progress,
    }
    write_json(out / "summary.json", summary)
    plot(records, comparisons, out / "convergence.png",
         f"GPT {gpt_params() / 1e6:.1f}M, {STEPS} steps x {BATCH * SEQ_LEN:,} tokens, peak lr {args.peak_lr}, "
         f"virtual ranks on {', '.join(summary['devices'])}", args.target_pct)
    table = results_table(comparisons)
    unfinished = sorted(summary["unfinished"] + summary["not_started"])
    (out / "README.md").write_text(README.format(
        params=gpt_params() / 1e6, peak_lr=args.peak_lr, finished=len(finished), table=table,
        planned=len(planned | {r.run.name for r in finished}),
        unfinished=f"; still to run: {', '.join(unfinished)}" if unfinished else ""))
    print(table)
    print(f"\n{len(finished)} finished run(s) -> {rel(out)}/ (summary.json, convergence.png, README.md)")
    return 0


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser, verbs = study_parser("convergence_study.py", __doc__, "tokenize the installed packages' Python files "
                                 "(cached)", DATA, RUNS_DIR, [DONE_DIR, RESULTS], RESULTS, SEEDS)
    verbs["report"].add_argument("--runs-dir", default=rel(DONE_DIR), help="the calls' run directories, unpacked "
                                 "(default: %(default)s)")
    verbs["report"].add_argument("--target-pct", type=float, default=TARGET_PCT, help="resolution target, %% of "
                                 "baseline (default: %(default)s)")
    for verb in ("plan", "run", "report"):
        verbs[verb].add_argument("--peak-lr", type=peak_lr_arg, default=PEAK_LR, metavar="LR",
                                 help=f"AdamW's peak lr (default: {PEAK_LR}; the final lr is a tenth of it). "
                                 "Another value is a study of its own: the default directories get -lr<LR> "
                                 "appended (runs/convergence-lr5e-4/, runs/convergence-done-lr5e-4/, "
                                 f"{rel(RESULTS)}-lr5e-4/), and runs of one lr never pair with another's")
    return dispatch(parser, argv, {"prepare": cmd_prepare, "plan": cmd_plan, "run": cmd_run, "report": cmd_report})


if __name__ == "__main__":
    sys.exit(main())
