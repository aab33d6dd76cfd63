"""`halfbyte train`.

Every check that can fail on bad input runs here, in the launching process, before any worker starts:
a problem is one line on stderr naming it and the fix, and exit code 2.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch

from halfbyte.comm import CommConfig, WorkerError, init_process_group_from_env, spawn
from halfbyte.engine import checkpoint
from halfbyte.engine.outer import check_islands, island_gpus_per_node
from halfbyte.train import rundir
from halfbyte.train.config import (
    DEBUG_ENV,
    Config,
    ConfigError,
    batch_layout,
    changed_meaning,
    help_text,
    make_config,
    parse_overrides,
    validate,
)
from halfbyte.train.data import builtin_token_files, open_tokens, val_path_for
from halfbyte.train.loop import RunPlan, TrainingStopped, run
from halfbyte.train.model import GPTConfig, PRESETS, check_hf_model
from halfbyte.train.prepare_cli import sidecar_path
from halfbyte.train.tokenizer import TokenizerError, load_tokenizer

BUILTIN_DATA = "shakespeare"
PG_TIMEOUT_S = 600.0  # a rank stuck this long in a collective is an error, not a hang
START_OPTIONS = {"resume": "", "overwrite": False, "replan": False}  # per invocation, never restored
# [train] options added after checkpoints without them were written: the value such a run computed
# with (before train.weight_decay_on, weight decay applied to every parameter)
ADDED_LATER = {"weight_decay_on": "all"}


def _fail(command: str, message: str) -> int:
    print(f"halfbyte {command}: error: {message}", file=sys.stderr)
    return 2


def _launched() -> bool:
    """Started by torchrun (or another launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve_tokenizer(cfg: Config, data_vocab: int, builtin: bool, train_path: Path) -> str | None:
    """The tokenizer for the text sample: explicit, or `auto` from the data (None: no sample)."""
    name = cfg.data.tokenizer
    if name == "auto":
        info = sidecar_path(train_path)
        hf_dir = Path(cfg.model.name[3:]) if cfg.model.name.startswith("hf:") else None
        if builtin:
            name = "builtin"
        elif info.is_file():
            name = json.loads(info.read_text()).get("tokenizer", "")
        elif hf_dir is not None and (hf_dir / "tokenizer.json").is_file():
            name = str(hf_dir / "tokenizer.json")
        else:
            return None
        try:
            tokenizer = load_tokenizer(name)
        except TokenizerError:
            return None
        return name if tokenizer.vocab_size == data_vocab else None
    tokenizer = load_tokenizer(name)
    if not builtin and tokenizer.vocab_size != data_vocab:
        raise ConfigError(f"--tokenizer {name} has {tokenizer.vocab_size} tokens but {train_path} was made "
                          f"with {data_vocab}; pass the tokenizer used by prepare-data")
    return name


def _find_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint --resume names (None: start at step 0); ConfigError when there is none."""
    resume, root = cfg.train.resume, cfg.out_dir / "checkpoints"
    if not resume:
        return None
    found = checkpoint.complete_checkpoints(root)
    if resume == "auto":
        return found[-1] if found else None
    if resume == "latest":
        if not found:
            raise ConfigError(f"--resume latest: no complete checkpoint in {root}; use --resume auto to start "
                              "the run if it has none, or pass --out of the run to continue")
        return found[-1]
    path = Path(resume)
    in_run = checkpoint.complete_checkpoints(path / "checkpoints")
    if in_run and not (path / checkpoint.MARKER).is_file():  # the run's directory, not one of its checkpoints
        raise ConfigError(f"--resume {resume} is a run directory, not a checkpoint: continue it with --out {resume} "
                          f"--resume auto, or name its checkpoint, e.g. --resume {in_run[-1]}")
    return path


def resolve_config(argv: list[str]) -> tuple[Config, Path | None, dict | None] | None:
    """The run's Config and, when a checkpoint is resumed, its path and meta.json (None: --help). A resumed
    run takes its saved options; options given again may not change what the run computes (steps
    only with --train.replan)."""
    overrides = parse_overrides(argv)
    if overrides is None:
        return None
    given = {k for k, _ in overrides}
    cfg = make_config(overrides)
    validate(cfg, given)
    path = _find_checkpoint(cfg)
    if path is None:
        return cfg, None, None
    meta = checkpoint.verify(path)
    saved_tree = meta["extra"].get("config")
    if not isinstance(saved_tree, dict):
        raise ConfigError(f"checkpoint {path} does not hold its run's options; it cannot be resumed here")
    # how that run was started (--resume, --overwrite, --replan) is not one of its options
    saved_tree = {**saved_tree, "train": {**ADDED_LATER, **saved_tree.get("train", {}), **START_OPTIONS}}
    saved = make_config([], base=json.loads(json.dumps(saved_tree)))
    cfg = make_config(overrides, base=json.loads(json.dumps(saved_tree)))
    validate(cfg, given)
    changed = changed_meaning(saved, cfg)
    if cfg.train.replan:
        changed = [k for k in changed if k != "train.steps"]
    if changed:  # name what the user gave first (a preset changes many comm keys)
        k = next((c for c in changed if any(c == g or c.startswith(g + ".") for g in given)), changed[0])
        raise ConfigError(f"--resume: --{k} would change what the run computes (saved {_lookup(saved, k)!r}, "
                          f"given {_lookup(cfg, k)!r}); resume with the run's own options, or start a new "
                          "run in another --out" + (" (a new --train.steps needs --train.replan)"
                                                    if k == "train.steps" else ""))
    return cfg, path, meta


def _lookup(cfg: Config, key: str) -> object:
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part, None)
    return value


def _layout(cfg: Config, world: int, launched: bool) -> tuple[int | None, CommConfig, str | None]:
    """Ranks per (emulated) node (None: the launcher's LOCAL_WORLD_SIZE), the comm config on that
    layout (the single-node rule, CommConfig.for_nodes) and its note."""
    per_node = cfg.train.gpus_per_node or (None if launched else 1)  # a local worker or virtual rank: a node
    if per_node and world % per_node:
        raise ConfigError(f"--train.gpus_per_node={per_node} does not divide the {world} ranks; "
                          f"use a divisor of {world}")
    nodes = world // (per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    comm, note = cfg.comm.for_nodes(nodes)
    return per_node, comm, note


def _islands(cfg: Config, world: int, gpus_per_node: int | None, comm: CommConfig) -> int:
    """Number of islands for local updates (0: off), checked like build_islands checks it."""
    if not cfg.outer.enabled:
        return 0
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    islands = cfg.outer.islands or world // per_node
    try:
        size = check_islands(world, islands)
        island_per_node = island_gpus_per_node(size, per_node)
    except ValueError as e:
        raise ConfigError(f"--islands: {e}") from None
    if comm.grads == "two-level" and size // island_per_node < 2:
        raise ConfigError(f"preset {cfg.train.preset} reduces gradients over two levels inside an island, "
                          f"but each of the {islands} islands has 1 node: use fewer --islands, "
                          "a smaller --train.gpus_per_node, or --preset qwd")
    return islands


def make_plan(cfg: Config, resume_path: Path | None = None) -> RunPlan:
    """Resolve data, tokenizer, world size and batch layout; raise ConfigError & co on bad input."""
    launched = _launched()
    virtual = cfg.train.virtual_ranks > 0
    if virtual and launched:
        raise ConfigError("--virtual-ranks runs one process and emulates the ranks: start it without torchrun")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--train.device=cuda, but torch sees no CUDA GPU here; use --train.device cpu or auto")
    world = cfg.train.virtual_ranks if virtual else int(os.environ["WORLD_SIZE"]) if launched else cfg.train.workers
    gpus_per_node, comm, note = _layout(cfg, world, launched)
    islands = _islands(cfg, world, gpus_per_node, comm)
    micro, accum = batch_layout(cfg, world, "virtual ranks" if virtual else "workers")

    m = cfg.model
    if m.name.startswith("hf:"):
        check_hf_model(m.name[3:])
    else:  # architecture checks (no weights are built here)
        n_layer, n_head, d_model, ctx = PRESETS[m.name]
        GPTConfig(vocab_size=1, n_layer=m.n_layer or n_layer, n_head=m.n_head or n_head,
                  d_model=m.d_model or d_model, ctx=m.ctx or ctx, rope=m.rope, dropout=m.dropout)

    builtin = cfg.data.path == BUILTIN_DATA
    if builtin:
        name = "builtin" if cfg.data.tokenizer == "auto" else cfg.data.tokenizer
        show_progress = not launched or os.environ.get("RANK") == "0"
        train_path, val_path = builtin_token_files(load_tokenizer(name), progress=show_progress)
    else:
        train_path = Path(cfg.data.path)
        if cfg.data.val_path:
            val_path = Path(cfg.data.val_path)
            open_tokens(val_path)
        else:
            val_path = val_path_for(train_path)
    train = open_tokens(train_path)
    val_ok = val_path.is_file() and (len(open_tokens(val_path)) - 1) // cfg.train.seq_len >= 1
    if (len(train) - 1) // cfg.train.seq_len < world:
        raise ConfigError(f"{train_path} has {len(train)} tokens: too few for {world} workers at seq_len "
                          f"{cfg.train.seq_len}; use more data or a shorter --train.seq_len")
    if m.name.startswith("hf:"):
        hf_vocab = json.loads((Path(m.name[3:]) / "config.json").read_text()).get("vocab_size", 0)
        if train.vocab_size > hf_vocab:
            raise ConfigError(f"{train_path} uses {train.vocab_size} token ids but {m.name} has only {hf_vocab}; "
                              "prepare the data with the model's tokenizer.json")
    previous = None
    if not launched or os.environ.get("RANK") == "0":  # the leader alone touches the directory
        previous = rundir.prepare(cfg.out_dir, fresh_start=resume_path is None,
                                  overwrite=cfg.train.overwrite or cfg.train.resume == "auto")
    return RunPlan(
        cfg=cfg, comm=comm, train_path=str(train_path), val_path=str(val_path) if val_ok else None,
        vocab_size=train.vocab_size, tokenizer=_resolve_tokenizer(cfg, train.vocab_size, builtin, train_path),
        builtin_data=builtin, resume_path=str(resume_path) if resume_path else None, world_size=world,
        gpus_per_node=gpus_per_node, micro_batch=micro, accum=accum, local_workers=not launched and not virtual,
        virtual=virtual, islands=islands, notes=[note] if note else [],
        previous_run=str(previous) if previous else None,
    )


class _ForwardStop:
    """In the launching process: the first Ctrl-C / SIGTERM asks the workers to save and stop (a terminal's
    Ctrl-C reaches them too; a signal sent to this process alone is forwarded); a second one aborts."""

    def __enter__(self) -> _ForwardStop:
        self.count = 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        print("\nstopping: the workers save a checkpoint first (press Ctrl-C again to abort)", file=sys.stderr)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _finished(meta: dict, cfg: Config) -> str | None:
    """A message when the resumed checkpoint is at or past the run's last step (nothing to train)."""
    step = meta["extra"].get("step")
    if step is not None and step >= cfg.train.steps:
        return (f"the run in {cfg.out_dir} finished at step {step} of {cfg.train.steps}; nothing to do (a "
                "larger --train.steps with --train.replan extends it)")
    return None


def train_main(argv: list[str]) -> int:
    debug = os.environ.get(DEBUG_ENV) == "1"
    leader = not _launched() or os.environ.get("RANK") == "0"
    try:
        resolved = resolve_config(argv)
        if resolved is None:
            print(help_text())
            return 0
        cfg, resume_path, meta = resolved
        if meta is not None and (message := _finished(meta, cfg)):
            if leader:
                print(f"halfbyte train: {message}")
            return 0
        plan = make_plan(cfg, resume_path)
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, TokenFileError, ... are ValueErrors
        if debug:
            raise
        if leader:
            return _fail("train", str(e))
        return 2

    if plan.virtual:
        return _run_here(plan, debug)
    if _launched():
        import torch.distributed as dist

        init_process_group_from_env(timeout_s=PG_TIMEOUT_S)
        try:
            return _run_here(plan, debug)
        finally:
            dist.destroy_process_group()
    try:
        with _ForwardStop(), tempfile.TemporaryDirectory(prefix="halfbyte-train-") as errors:
            plan.user_error_dir = errors
            try:
                spawn(run_worker, plan.world_size, plan, timeout_s=float("inf"), backend="gloo",
                      pg_timeout_s=PG_TIMEOUT_S)
            except WorkerError as e:
                message = _user_error(Path(errors))
                if message is not None:  # the user's to fix: one line, as for the checks made up front
                    return _fail("train", message)
                print(f"halfbyte train: error: a worker failed, all workers stopped.\n{e}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("halfbyte train: aborted", file=sys.stderr)
        return 130
    return 0


# Failures inside training that are the user's to fix: one line, exit code 2 (HALFBYTE_DEBUG=1: traceback).
USER_ERRORS = (checkpoint.CheckpointError, TrainingStopped, torch.OutOfMemoryError)


def _user_message(e: BaseException, plan: RunPlan) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return (f"out of memory with {plan.micro_batch} sequences of {plan.cfg.train.seq_len} tokens per "
                f"rank per pass: lower --train.micro_batch_size (gradient accumulation keeps the global "
                f"batch of {plan.cfg.train.batch_size}) or --train.seq_len")
    return str(e)


def _run_here(plan: RunPlan, debug: bool) -> int:
    """Train in this process (virtual ranks, or one rank under torchrun): a user-facing failure is one
    line and exit code 2."""
    try:
        run(plan)
    except USER_ERRORS as e:
        if debug:
            raise
        if plan.virtual or os.environ.get("RANK") == "0":
            _fail("train", _user_message(e, plan))
        return 2
    return 0


def run_worker(plan: RunPlan) -> dict:
    """A local worker's body: train. A user-facing failure is left as one line in
    plan.user_error_dir (named by the rank) for the parent to print, and the worker exits at once
    (os._exit: tearing down a process group that peers still use can abort noisily; printing here
    would show the line once per worker)."""
    try:
        return run(plan)
    except USER_ERRORS as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        (Path(plan.user_error_dir) / f"rank{os.environ['RANK']}").write_text(_user_message(e, plan))
        os._exit(2)


def _user_error(directory: Path) -> str | None:
    """The message the lowest rank left in `directory` (run_worker), or None when none did."""
    left = sorted(directory.glob("rank*"), key=lambda p: int(p.name.removeprefix("rank")))
    return left[0].read_text() if left else None
