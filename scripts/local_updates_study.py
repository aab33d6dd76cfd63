"""Issue 20: local updates that hold the loss. A paired multi-seed study of islands with local steps
against every-step data parallel, on the convergence study's machinery (scripts/convergence_study.py:
the same 21.0M GPT, data, tokens, evaluation set, seeds and W=8 virtual ranks; the same launcher
(study_common.Launcher), provenance and paired statistics from halfbyte.bench.paired_stats).

Design (docs/local_updates.md, "The study" says why). Every run trains 67.1M tokens on W=8 virtual
ranks from `--seed k` (initialization, data order and rounding seeds: for a seed k every arm starts
from the same weights), and is scored by its final validation loss on the fixed 2,097,152-token set.
References: every-step DP `baseline-w8` (bf16) and `sdp4bit-w8`: the convergence study's runs, same
names and commands (finished ones of that study are reused). Local-update arms
`m<M>-<batch>-<opt>-t<tau>-d<delay>`: M islands in {2, 4, 8} of 8/M ranks (one emulated node each,
every-step bf16 DP inside), int4 pseudo-gradients with error feedback across, the outer optimizer
sign-momentum (`sm`), DiLoCo `nesterov` or `average` at its defaults, tau in {16, 32, 64, 128} and
the outer exchange applied at once (d0) or one inner step later (d1, overlapped); batch `split`:
the global batch of 128 sequences split across the islands, 1024 steps (each island 128/M sequences
per step); `full`: DiLoCo-style, each island keeps the full 128 sequences for 1024/M steps (warm-up
and intervals scaled by 1/M). A few `-lr<x>` arms sweep the outer learning rate.

Priority (`plan` shows it; `run` starts runs in this order, seed by seed inside a tier, so a short
GPU budget buys the most informative pairs first). Plain averaging leads: on the GPU at tau 32,
seeds 0-3, it ended +4.4% above every-step DP and DiLoCo's Nesterov +7.9% (sign momentum +25% at 4x
its paper's step and +64% at it, seed 0); on the CPU averaging beat Nesterov at every tau and its gap
shrank with tau (docs/local_updates.md, "The study"):
  1. baseline-w8, m2-split-average-t32-d0 / -d1, m2-split-nesterov-t32-d0 / -d1
     the M=2 target and the cost of the overlap, for the two best outer optimizers
  2. m2-split-average-t16-d0, m4- and m8-split-average-t32-d0, m2-full-average-t32-d0, sdp4bit-w8
     a shorter round, M=4 / M=8, (b), 4-bit DP
  3. m2-split-average-t64-d0, m4-split-average-t32-d1, m2-split-sm-t32-d0 (the paper's step) and
     -lr4, m2-split-nesterov t16 / t64 / t128 d0, m2-split-sm-t32-d1
  4. outer lr (tiers 1-3 left averaging ahead, Nesterov behind at every tau, sign momentum a
     step-size question): m2-split-sm-t32-d0 at lr 8 and 16, m2-split-average-t32-d0 at lr 1.5 and 2
     (a step past the islands' mean; on CPU, tiny GPT, 120 steps, one seed, both ended 1.0-1.4%
     above lr 1), m2-split-sm-t32-d0 at lr 2, m2-split-nesterov-t32-d0 at lr 0.35 and 1
  5. Nesterov at M=4 / M=8 and (b): m4-, m8-split- and m2-, m4-, m8-full-nesterov-t32-d0,
     m4-split- and m2-full-nesterov-t32-d1
  6. the rest of M x batch x optimizer x tau x delay

On the GPU machine (the repository is the working directory; runs/ is ignored by git):

    source scripts/mps.sh start                                  # MPS: the runs share the GPU
    python3 scripts/local_updates_study.py prepare               # = convergence_study.py prepare (cached)
    python3 scripts/local_updates_study.py run --deadline-s 540 --parallel 6 --snapshot $OUT/runs.tgz

`run` is convergence_study.py's (convergence_study.run_call on study_common.Launcher, the one launcher
of both studies: resumable runs, --parallel at a time, shedding the last-started runs so that the
others end by --deadline-s, the shed ones resuming first once the kept ones end, SIGTERM
--stop-margin-s before it), with each run's own steps: it is done at its last step, its rate is
measured over 3/64 of its steps (evaluations and saves apart, at their measured cost), and its
predicted time is its steps x batch times the time per sequence alone of the runs finished in the
call (a DiLoCo-style run of 1024/M steps carries M times the batch: the same tokens, short in steps but not in time). Shedding goes by start order (= priority
order) only, whatever the lengths: a run of fewer steps started last is shed like any other, and the
check that picks how many to keep uses each run's measured time to its end, not its steps. Runs
finished in earlier calls are skipped when runs/local-updates-done or runs/convergence-done holds
them, or when `report` committed them under benchmarks/results/ (local-updates-21m/, convergence-21m/:
a fresh checkout has only these). Delayed arms (d > 0) end on the outer weights: the trainer applies
an exchange still in flight after the last step (halfbyte.train.loop's Ranks.flush_outer).

Here, after each call (`mkdir -p runs/local-updates-done; tar xzf runs.tgz -C runs/local-updates-done`):

    python scripts/local_updates_study.py plan [--tier 1]         # the grid, its status, the commands
    python scripts/local_updates_study.py report [--same-commit]  # -> benchmarks/results/local-updates-21m/

`report` pairs finished runs by seed: every arm against baseline-w8 (targets: within 1% for M=2, 2%
for M=4 and M=8), every d1 arm against its d0 twin (target 0.3%); inter-island bytes per training
token next to every-step DP's between the same M islands (bf16 and sdp4bit); writes
<run>/{metrics.jsonl,command.txt,provenance.json}, summary.json, local_updates.png (final-loss gap vs
inter-island bytes per token) and README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# scripts/ is on sys.path when a script runs, so the convergence study (its design) and the machinery
# both studies run on (study_common: run state, provenance, the Launcher) import by name
import convergence_study as cs
from study_common import (
    Record, StudyError, check_data_and_code, dispatch, first_difference, pick, print_commands, read_metrics, rel,
    report_runs, run_status, study_parser, write_json,
)

ROOT = cs.ROOT
RESULTS = ROOT / "benchmarks" / "results" / f"local-updates-{cs.MODEL_TAG}"
RUNS_DIR = ROOT / "runs" / "local-updates"  # where runs train (checkpoints included)
DONE_DIR = ROOT / "runs" / "local-updates-done"  # earlier calls' run directories, unpacked here, carried there
# the convergence study's finished baseline-w8 / sdp4bit-w8 count too, and so do the runs `report`
# committed (a fresh checkout has no runs/)
DONE_DIRS = (DONE_DIR, cs.DONE_DIR, RESULTS, cs.RESULTS)

WORLD = 8  # the W=8 study's virtual ranks
ISLANDS = (2, 4, 8)
BATCHES = ("split", "full")
OPTIMIZERS = {"sm": "sign-momentum", "nesterov": "nesterov", "average": "average"}
TAUS = (16, 32, 64, 128)
DELAYS = (0, 1)
OUTER_BITS = 4
INNER_PRESET = "baseline"  # every-step bf16 DP inside an island
TARGET_PCT = {2: 1.0, 4: 2.0, 8: 2.0}  # issue 20: M=2 within 1%, M=4 within 2%, M=8 reported (2%)
DELAY_TARGET_PCT = 0.3  # the overlapped exchange costs <= 0.3% against the blocking one
DP_TARGET_PCT = cs.TARGET_PCT
# What a batch mode changes in the convergence study's DESIGN (everything else is the same).
SCALED = ("--steps", "--batch-size", "--schedule.warmup_steps")


@dataclass(frozen=True)
class Arm:
    """Every-step DP (islands 0: the convergence study's arm `preset` at W=8) or M islands."""

    name: str
    tier: int
    islands: int = 0
    batch: str = "split"
    optimizer: str = ""  # a key of OPTIMIZERS
    tau: int = 0
    delay: int = 0
    outer_lr: float | None = None
    preset: str = INNER_PRESET

    @property
    def steps(self) -> int:
        return cs.STEPS // self.islands if self.batch == "full" else cs.STEPS

    @property
    def batch_size(self) -> int:
        return cs.BATCH * self.islands if self.batch == "full" else cs.BATCH

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * cs.SEQ_LEN

    @property
    def gpus_per_node(self) -> int:
        return WORLD // self.islands if self.islands else cs.LAYOUT[WORLD]

    def design(self) -> dict[str, str]:
        """The convergence study's DESIGN with this arm's steps, batch and warm-up."""
        if not self.islands or self.batch == "split":
            return dict(cs.DESIGN)
        warmup = int(cs.DESIGN["--schedule.warmup_steps"]) // self.islands
        return cs.DESIGN | {"--steps": str(self.steps), "--batch-size": str(self.batch_size),
                            "--schedule.warmup_steps": str(warmup)}

    def output_args(self) -> list[str]:
        """The convergence study's OUTPUT_ARGS, intervals scaled to the run's steps (8 evaluations,
        a checkpoint every quarter)."""
        scale = {"--train.eval_interval": self.steps // 8, "--train.checkpoint_interval": self.steps // 4}
        args = list(cs.OUTPUT_ARGS)
        return [str(scale[args[i - 1]]) if i % 2 and args[i - 1] in scale else a for i, a in enumerate(args)]

    @property
    def label(self) -> str:
        if not self.islands:
            return f"every-step DP, {self.preset}"
        lr = "" if self.outer_lr is None else f", outer lr {self.outer_lr:g}"
        return (f"{self.islands} islands, {self.batch} batch, {OPTIMIZERS[self.optimizer]}, tau {self.tau}, "
                f"delay {self.delay}{lr}")

    @property
    def twin(self) -> str | None:
        """The d0 arm a delayed arm is paired with."""
        return self.name.replace(f"-d{self.delay}", "-d0", 1) if self.delay else None


@dataclass(frozen=True)
class Run:
    """One arm at one seed; what study_common's Launcher asks of a run (a StudyRun) comes from its arm."""

    arm: Arm
    seed: int
    world = WORLD

    @property
    def name(self) -> str:
        return f"{self.arm.name}-seed{self.seed}"

    @property
    def design(self) -> dict[str, str]:
        return self.arm.design()

    @property
    def steps(self) -> int:
        return self.arm.steps

    @property
    def batch_size(self) -> int:
        return self.arm.batch_size

    @property
    def gpus_per_node(self) -> int:
        return self.arm.gpus_per_node

    def argv(self, data: Path, runs_dir: Path, train_cmd: list[str]) -> list[str]:
        """The exact command of the run. Every-step DP: the convergence study's run's (the same run)."""
        a = self.arm
        if not a.islands:
            return cs.Run(a.preset, WORLD, self.seed).argv(data, runs_dir, train_cmd)
        outer = ["--islands", str(a.islands), "--outer", OPTIMIZERS[a.optimizer], "--local-steps", str(a.tau),
                 "--outer-bits", str(OUTER_BITS), "--outer.delay", str(a.delay)]
        if a.outer_lr is not None:
            outer += ["--outer-lr", str(a.outer_lr)]
        return [*train_cmd, *(x for kv in a.design().items() for x in kv), *a.output_args(), "--data", rel(data),
                "--seed", str(self.seed), "--virtual-ranks", str(WORLD), "--virtual-gpus-per-node",
                str(a.gpus_per_node), "--train.micro_batch_size", str(cs.BATCH // WORLD), "--preset", a.preset,
                *outer, "--train.name", self.name, "--out", rel(runs_dir / self.name), "--resume", "auto"]

    def provenance(self, data: dict[str, Any]) -> dict[str, Any]:
        a = self.arm
        return {"run": self.name, "arm": a.preset if not a.islands else a.name, "world": WORLD,
                "gpus_per_node": a.gpus_per_node, "nodes": WORLD // a.gpus_per_node, "seed": self.seed,
                "design": a.design(), "data": data, "output_args": a.output_args(), "study": "local-updates",
                "islands": a.islands, "batch": a.batch, "optimizer": OPTIMIZERS.get(a.optimizer), "tau": a.tau,
                "delay": a.delay, "outer_lr": a.outer_lr, "outer_bits": OUTER_BITS if a.islands else None}


def local_arm(tier: int, M: int, batch: str, opt: str, tau: int, delay: int, lr: float | None = None) -> Arm:
    name = f"m{M}-{batch}-{opt}-t{tau}-d{delay}" + ("" if lr is None else f"-lr{lr:g}")
    return Arm(name, tier, M, batch, opt, tau, delay, lr)


def arms() -> list[Arm]:
    """Every arm, in priority order (the module docstring lists the tiers)."""
    def lo(tier: int, *a: Any) -> Arm:
        return local_arm(tier, *a)

    ordered = [Arm("baseline-w8", 1, preset="baseline"), lo(1, 2, "split", "average", 32, 0),
               lo(1, 2, "split", "average", 32, 1), lo(1, 2, "split", "nesterov", 32, 0),
               lo(1, 2, "split", "nesterov", 32, 1),
               lo(2, 2, "split", "average", 16, 0), lo(2, 4, "split", "average", 32, 0),
               lo(2, 8, "split", "average", 32, 0), lo(2, 2, "full", "average", 32, 0),
               Arm("sdp4bit-w8", 2, preset="sdp4bit"),
               lo(3, 2, "split", "average", 64, 0), lo(3, 4, "split", "average", 32, 1),
               lo(3, 2, "split", "sm", 32, 0), lo(3, 2, "split", "sm", 32, 0, 4.0),
               *(lo(3, 2, "split", "nesterov", tau, 0) for tau in (16, 64, 128)), lo(3, 2, "split", "sm", 32, 1),
               *(lo(4, 2, "split", "sm", 32, 0, lr) for lr in (8.0, 16.0)),
               *(lo(4, 2, "split", "average", 32, 0, lr) for lr in (1.5, 2.0)), lo(4, 2, "split", "sm", 32, 0, 2.0),
               *(lo(4, 2, "split", "nesterov", 32, 0, lr) for lr in (0.35, 1.0)),
               lo(5, 4, "split", "nesterov", 32, 0), lo(5, 8, "split", "nesterov", 32, 0),
               lo(5, 2, "full", "nesterov", 32, 0), lo(5, 4, "split", "nesterov", 32, 1),
               lo(5, 4, "full", "nesterov", 32, 0), lo(5, 8, "full", "nesterov", 32, 0),
               lo(5, 2, "full", "nesterov", 32, 1)]
    seen = {a.name for a in ordered}
    rest = [lo(6, M, b, o, t, d) for M, b, t, o, d in itertools.product(ISLANDS, BATCHES, TAUS, OPTIMIZERS, DELAYS)]
    return ordered + [a for a in rest if a.name not in seen]


ARMS = {a.name: a for a in arms()}


def grid(seeds: int = cs.SEEDS, max_tier: int | None = None) -> list[Run]:
    """Every run in the order `run` starts them: tier by tier, inside a tier seed by seed."""
    tiers = sorted({a.tier for a in ARMS.values()})
    return [Run(a, s) for t in tiers if max_tier is None or t <= max_tier
            for s in range(seeds) for a in ARMS.values() if a.tier == t]


# ----------------------------------------------------------------------------------------- run


def select(args: argparse.Namespace) -> list[Run]:
    return pick(grid(args.seeds, args.tier), args.only, grid(args.seeds))


def cmd_run(args: argparse.Namespace) -> int:
    """convergence_study.run_call (study_common's Launcher) on this grid."""
    return cs.run_call(args, select(args), [Path(d) for d in args.done_in])


# ------------------------------------------------------------------------------------------ plan


def cmd_plan(args: argparse.Namespace) -> int:
    runs_dir, data = Path(args.runs_dir), Path(args.data)
    runs = select(args)
    print(f"GPT {cs.gpt_params() / 1e6:.2f}M parameters; every run {cs.STEPS * cs.BATCH * cs.SEQ_LEN / 1e6:.1f}M "
          f"tokens on {WORLD} virtual ranks; eval {cs.EVAL_TOKENS:,} tokens; {len(runs)} runs\n")
    print(f"{'run':<34} {'tier':>4} {'M':>2} {'batch':>5} {'steps':>5} {'seed':>4}  status")
    for run in runs:
        a = run.arm
        print(f"{run.name:<34} {a.tier:>4} {a.islands or '-':>2} {a.batch if a.islands else '-':>5} {a.steps:>5} "
              f"{run.seed:>4}  {run_status(run, runs_dir, [Path(d) for d in args.done_in])}")
    print_commands("scripts/local_updates_study.py", runs, data, runs_dir)
    return 0


# ---------------------------------------------------------------------------------------- report


def dp_island_bytes_per_step(preset: str, islands: int, params: int | None = None) -> int:
    """Bytes every-step DP sends per step across M islands (the W=8 ranks as M nodes of 8/M, bf16
    weights and gradients on the GPU), summed over the ranks: the engine's own accounting
    (halfbyte.comm.accounting, as world.py records it), bucket padding left out."""
    from halfbyte.comm import CommConfig
    from halfbyte.comm import accounting as acc

    n, M, L = params or cs.gpt_params(), islands, WORLD // islands
    comm, bf16 = CommConfig.preset(preset), 2
    shard = acc.chunk_numel(n, WORLD)
    weights = acc.all_gather_bytes(shard, bf16 if comm.weights == "full" else comm.weight_spec, M, L)
    if comm.grads == "two-level":
        grads = acc.reduce_scatter_two_level_bytes(n, comm.grad_intra_spec, comm.grad_spec, M, L)
    else:
        grads = acc.reduce_scatter_bytes(n, comm.grad_spec or bf16, M, L)
    return WORLD * (weights["inter"] + grads["inter"])


def collect(runs_dirs: list[Path], seeds: int) -> list[Record]:
    """This study's runs under the directories (the first one found of each name); others are left out."""
    found = [(path, json.loads(path.read_text())) for d in runs_dirs for path in sorted(d.glob("*/provenance.json"))]
    # every seed found counts: the convergence study runs its baseline / sdp4bit pairs past this grid's seeds
    known = {r.name: r for r in grid(max([seeds, *(p.get("seed", 0) + 1 for _, p in found)]))}
    records: dict[str, Record] = {}
    for path, p in found:
        if p["run"] in known and p["run"] not in records:
            records[p["run"]] = Record(known[p["run"]], path.parent, p, read_metrics(path.parent))
    if not records:
        where = ", ".join(rel(d) for d in runs_dirs)
        raise StudyError(f"no study runs under {where}; unpack the calls' runs.tgz there")
    return list(records.values())


def check_pairable(records: list[Record], same_commit: bool) -> None:
    """Each run's recorded design is its arm's, one data set (and with same_commit one code version)."""
    for r in records:
        design, had = r.run.arm.design(), cs.recorded_design(r.provenance)
        key = first_difference(design, had)
        if key is not None:
            raise StudyError(f"{r.run.name} was run with {key} {had.get(key)}, its arm's design has "
                             f"{design.get(key)}; report only runs of this study's design")
    check_data_and_code(records, same_commit)


def _gap(arm: dict[int, float], base: dict[int, float], target: float) -> dict[str, Any]:
    from halfbyte.bench.paired_stats import paired_gap

    common = sorted(set(arm) & set(base))
    if len(common) == 1:  # a first look, not a statistic: the seed's own difference, no mean or CI
        seed = common[0]
        nats = arm[seed] - base[seed]
        return {"n_seeds": 1, "single_seed": {"seed": seed, "nats": nats, "pct": 100 * nats / base[seed]},
                "note": f"one seed ({seed}): no confidence interval"}
    try:
        return paired_gap(arm, base).to_dict(target)
    except ValueError as e:
        return {"n_seeds": len(common), "note": str(e)}


def compare(records: list[Record]) -> dict[str, Any]:
    """Per arm: final losses by seed, the paired gap to baseline-w8 (and of a delayed arm to its d0
    twin), inter-island bytes per token and every-step DP's between the same islands."""
    finals: dict[str, dict[int, float]] = {}
    last: dict[str, dict] = {}
    for r in records:
        if r.final is not None:
            finals.setdefault(r.run.arm.name, {})[r.run.seed] = r.final
            last.setdefault(r.run.arm.name, r.metrics[-1])
    base = finals.get("baseline-w8", {})
    dp = {M: {p: dp_island_bytes_per_step(p, M) / (cs.BATCH * cs.SEQ_LEN) for p in ("baseline", "sdp4bit")}
          for M in ISLANDS}
    out: dict[str, Any] = {}
    for name, arm in ARMS.items():
        if name not in finals:
            continue
        m, tokens = last[name], arm.tokens
        entry: dict[str, Any] = {"label": arm.label, "tier": arm.tier, "islands": arm.islands, "batch": arm.batch,
                                 "optimizer": OPTIMIZERS.get(arm.optimizer), "tau": arm.tau, "delay": arm.delay,
                                 "outer_lr": arm.outer_lr, "steps": arm.steps, "tokens": tokens,
                                 "seeds": sorted(finals[name]),
                                 "final_val_loss": [finals[name][s] for s in sorted(finals[name])]}
        if arm.islands:
            island = m.get("wire_island_bytes", 0)
            entry |= {"outer_steps": m.get("outer_steps"), "island_bytes_per_token": island / tokens,
                      "inside_island_bytes_per_token": (m["wire_intra_bytes"] + m["wire_inter_bytes"]) / tokens,
                      "dp_bf16_bytes_per_token": dp[arm.islands]["baseline"],
                      "dp_sdp4bit_bytes_per_token": dp[arm.islands]["sdp4bit"],
                      "fewer_than_dp_bf16": dp[arm.islands]["baseline"] / island * tokens if island else None}
            entry["vs_baseline"] = _gap(finals[name], base, TARGET_PCT[arm.islands])
            if arm.twin:
                entry["vs_no_delay"] = (_gap(finals[name], finals[arm.twin], DELAY_TARGET_PCT) if arm.twin in finals
                                        else {"n_seeds": 0, "note": f"{arm.twin} has no finished run"})
        else:
            measured = m["wire_inter_bytes"] / tokens  # the 2 x 4 layout: 2 islands of 4 ranks
            entry |= {"measured_bytes_per_token_2_islands": measured,
                      "island_bytes_per_token": {M: dp[M][arm.preset] for M in ISLANDS}}
            if name != "baseline-w8":
                entry["vs_baseline"] = _gap(finals[name], base, DP_TARGET_PCT)
        out[name] = entry
    return out


def _fmt_gap(g: dict | None) -> tuple[str, str]:
    if not g:
        return "", ""
    if "single_seed" in g:
        one = g["single_seed"]
        return f"{one['pct']:+.2f}% (seed {one['seed']} only, no CI)", g["note"]
    if "pct" not in g:
        return "", g["note"]
    p = g["pct"]
    return f"{p['mean']:+.2f}% ({p['ci_low']:+.2f} .. {p['ci_high']:+.2f})", g["verdict"]["text"]


def results_table(comparisons: dict[str, Any]) -> str:
    header = ("| arm | seeds | final val loss | gap vs every-step DP bf16 (95% CI) | verdict | inter-island B/token "
              "| vs DP bf16 / sdp4bit (same M) | delay cost vs d0 (95% CI) |")
    lines = [header, "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, e in comparisons.items():
        mean = sum(e["final_val_loss"]) / len(e["final_val_loss"])
        gap, verdict = _fmt_gap(e.get("vs_baseline"))
        if e["islands"]:
            b = e["island_bytes_per_token"]
            bytes_ = f"{b:,.1f}" if b >= 10 else f"{b:.3g}"
            ratio = (f"{e['dp_bf16_bytes_per_token'] / b:,.0f}x / {e['dp_sdp4bit_bytes_per_token'] / b:,.0f}x fewer"
                     if b else "")
            delay = _fmt_gap(e.get("vs_no_delay"))[0] or (e.get("vs_no_delay") or {}).get("note", "")
        else:
            bytes_ = " / ".join(f"M={M}: {v:,.0f}" for M, v in e["island_bytes_per_token"].items())
            ratio, delay = "", ""
        lines.append(f"| `{name}` | {len(e['seeds'])} | {mean:.4f} | {gap} | {verdict} | {bytes_} | {ratio} "
                     f"| {delay} |")
    return "\n".join(lines)


def plot(comparisons: dict[str, Any], path: Path, title: str) -> None:
    """Final-loss gap to every-step DP (mean, 95% CI; an arm of one seed: its point, labelled so)
    against inter-island bytes per token, one panel per M; every-step DP bf16 and sdp4bit at their
    bytes between the same islands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ISLANDS), figsize=(6.2 * len(ISLANDS), 5), sharey=True)
    colors = dict(zip(TAUS, plt.get_cmap("viridis")([0.0, 0.33, 0.66, 0.95])))
    markers = {"sign-momentum": "o", "nesterov": "s", "average": "^"}
    sdp = comparisons.get("sdp4bit-w8", {}).get("vs_baseline", {})
    for ax, M in zip(axes, ISLANDS):
        for name, e in comparisons.items():
            g = e.get("vs_baseline", {})
            if e["islands"] != M or not ("pct" in g or "single_seed" in g) or not e["island_bytes_per_token"]:
                continue
            if "pct" in g:
                y, p, label = g["pct"]["mean"], g["pct"], name.removeprefix(f"m{M}-")
                yerr = [[y - p["ci_low"]], [p["ci_high"] - y]]
            else:  # one seed: the point without an interval, and said so
                y, yerr, label = g["single_seed"]["pct"], None, f"{name.removeprefix(f'm{M}-')} (1 seed)"
            ax.errorbar([e["island_bytes_per_token"]], [y], yerr=yerr, fmt=markers[e["optimizer"]],
                        color=colors[e["tau"]], capsize=3, ms=7, mfc="none" if e["delay"] else colors[e["tau"]],
                        alpha=1.0 if e["batch"] == "split" else 0.55)
            ax.annotate(label, (e["island_bytes_per_token"], y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        bf16 = dp_island_bytes_per_step("baseline", M) / (cs.BATCH * cs.SEQ_LEN)
        four = dp_island_bytes_per_step("sdp4bit", M) / (cs.BATCH * cs.SEQ_LEN)
        ax.plot([bf16], [0.0], "k*", ms=12, label="every-step DP bf16 (reference)")
        if "pct" in sdp:
            p = sdp["pct"]
            ax.errorbar([four], [p["mean"]], yerr=[[p["mean"] - p["ci_low"]], [p["ci_high"] - p["mean"]]], fmt="P",
                        color="tab:red", capsize=3, ms=9, label="every-step DP sdp4bit")
        else:
            ax.axvline(four, color="tab:red", lw=0.8, ls=":", label="every-step DP sdp4bit bytes")
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-TARGET_PCT[M], TARGET_PCT[M], color="green", alpha=0.08, label=f"+-{TARGET_PCT[M]:g}% target")
        ax.set_xscale("log")
        ax.set(title=f"M={M} islands of {WORLD // M} rank{'s' if WORLD > M else ''}",
               xlabel="inter-island bytes per training token (all ranks)",
               ylabel="final val loss - every-step DP bf16 (%, paired by seed)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=mk, color="gray", label=o) for o, mk in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=f"tau {t}") for t, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", mfc="none", color="gray", label="delay 1 (hollow)")]
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=7)
    fig.suptitle(title + " (faded: full batch per island, fewer steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


README = """# Local updates vs every-step data parallel, GPT {params:.1f}M (issue 20)

Made by `python scripts/local_updates_study.py report` from the runs listed in `summary.json` (designs,
data hashes, code versions, devices, every run's final validation loss); docs/local_updates.md says how
the study is designed and how to read it. Per run: `<run>/metrics.jsonl`, `command.txt`, `provenance.json`.
Figure: `local_updates.png`. Every run: {tokens:.1f}M training tokens on {world} virtual ranks, final validation
loss on {eval_tokens:,} held-out tokens; gaps are paired by seed (same initialization and data order) against
every-step DP bf16 (`baseline-w8`), delay costs against the same arm without delay. Inter-island bytes: summed
over the ranks, per training token; every-step DP's are its bytes between the same M islands (the {world} ranks
as M nodes), from halfbyte's byte accounting (for M=2 also measured: {measured}).

{finished} of {planned} planned runs finished{unfinished}.

{table}
"""


def cmd_report(args: argparse.Namespace) -> int:
    records = collect([Path(d) for d in args.runs_dir], args.seeds)
    check_pairable(records, args.same_commit)
    out, planned = Path(args.out), {run.name for run in grid(args.seeds)}
    finished, versions, progress = report_runs(records, out, planned)
    comparisons = compare(records)
    first = finished[0].provenance
    summary = {
        "study": "issue 20: local updates vs every-step DP, paired seeds, virtual ranks",
        "model": {"params": cs.gpt_params(), "n_layer": cs.N_LAYER, "d_model": cs.D_MODEL, "n_head": cs.N_HEAD,
                  "vocab": cs.VOCAB},
        "tokens_per_run": cs.STEPS * cs.BATCH * cs.SEQ_LEN, "world": WORLD, "design": cs.DESIGN, "data": first["data"],
        "targets_pct": {"vs_baseline": TARGET_PCT, "delay": DELAY_TARGET_PCT}, "confidence": 0.95,
        **versions, "arms": comparisons,
        "runs": [{"name": r.run.name, "arm": r.run.arm.name, "seed": r.run.seed, "final_val_loss": r.final,
                  "segments": len(r.provenance["segments"]), "train_s": r.metrics[-1].get("elapsed_s"),
                  "dir": rel(r.dir)} for r in finished],
        **progress,
    }
    write_json(out / "summary.json", summary)
    plot(comparisons, out / "local_updates.png",
         f"GPT {cs.gpt_params() / 1e6:.1f}M, {summary['tokens_per_run'] / 1e6:.1f}M tokens, {WORLD} virtual ranks on "
         f"{', '.join(versions['devices'])}")
    table = results_table(comparisons)
    base = comparisons.get("baseline-w8", {})
    measured = (f"{base['measured_bytes_per_token_2_islands']:,.0f} B/token for bf16 vs "
                f"{base['island_bytes_per_token'][2]:,.0f} from the accounting" if base else "no baseline run yet")
    still = sorted(summary["unfinished"])
    (out / "README.md").write_text(README.format(
        params=cs.gpt_params() / 1e6, tokens=summary["tokens_per_run"] / 1e6, world=WORLD, eval_tokens=cs.EVAL_TOKENS,
        measured=measured, finished=len(finished), planned=len(planned | {r.run.name for r in finished}), table=table,
        unfinished=(f"; unfinished: {', '.join(still)}" if still else "")
        + f"; {len(summary['not_started'])} not started"))
    print(table)
    print(f"\n{len(finished)} finished run(s) -> {rel(out)}/ (summary.json, local_updates.png, README.md)")
    return 0


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser, verbs = study_parser("local_updates_study.py", __doc__, "convergence_study.py prepare: the corpus (cached)",
                                 cs.DATA, RUNS_DIR, list(DONE_DIRS), RESULTS, cs.SEEDS)
    for verb in ("plan", "run"):
        verbs[verb].add_argument("--tier", type=int, help="only tiers up to this one (default: all)")
    verbs["report"].add_argument("--runs-dir", nargs="+", default=[rel(d) for d in DONE_DIRS],
                                 help="the calls' run directories, unpacked (default: %(default)s)")
    return dispatch(parser, argv, {"prepare": cs.cmd_prepare, "plan": cmd_plan, "run": cmd_run, "report": cmd_report})


if __name__ == "__main__":
    sys.exit(main())
