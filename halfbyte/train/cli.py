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
from pathlib import Path

from halfbyte.engine import CommConfig
from halfbyte.train.config import Config, ConfigError, batch_layout, help_text, parse_args
from halfbyte.train.data import builtin_token_files, open_tokens, val_path_for
from halfbyte.train.model import GPTConfig, PRESETS, check_hf_model
from halfbyte.train.prepare_cli import sidecar_path
from halfbyte.train.tokenizer import TokenizerError, load_tokenizer

BUILTIN_DATA = "shakespeare"
PG_TIMEOUT_S = 600.0  # a rank stuck this long in a collective is an error, not a hang


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


def _resume_path(cfg: Config) -> str | None:
    from halfbyte.train.loop import checkpoint_dirs

    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(cfg.out_dir)
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {cfg.out_dir / 'checkpoints'}; "
                              "run without --resume, or pass --out of the run to continue")
        return str(found[-1])
    if not (Path(resume) / "COMPLETE").is_file():
        raise ConfigError(f"--resume {resume} is not a complete checkpoint directory; "
                          f"use --resume alone for the newest one in the run's out_dir")
    return resume


def _gpus_per_node(cfg: Config, world: int, launched: bool) -> int | None:
    """Ranks per (emulated) node; None: the launcher's LOCAL_WORLD_SIZE."""
    two_level = CommConfig.preset(cfg.train.preset).grads == "two-level"
    per_node = cfg.train.gpus_per_node
    if not per_node and not launched:
        per_node = 1  # each local worker (virtual rank) is its own node: the inter-node hop is exercised
    if not per_node and two_level and int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        # one real node: emulate one node per rank so that the two-level gradient path has two levels
        if os.environ.get("RANK") == "0":
            print(f"note: one node of {world} ranks; preset {cfg.train.preset} emulates one node per rank "
                  "(set --train.gpus_per_node to choose)", file=sys.stderr)
        per_node = 1
    if per_node and world % per_node:
        raise ConfigError(f"--train.gpus_per_node={per_node} does not divide the {world} ranks; "
                          f"use a divisor of {world}")
    nodes = world // per_node if per_node else world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if two_level and nodes < 2:
        raise ConfigError(f"preset {cfg.train.preset} reduces gradients over two levels and needs at least 2 "
                          f"(emulated) nodes, but has {nodes}: use --workers 2 or more, a smaller "
                          f"--train.gpus_per_node, or --preset qwd")
    return per_node or None


def _islands(cfg: Config, world: int, gpus_per_node: int | None) -> int:
    """Number of islands for local updates (0: off), checked like build_islands checks it."""
    from halfbyte.engine.local import check_islands

    if not cfg.outer.enabled:
        return 0
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    islands = cfg.outer.islands or world // per_node
    try:
        size = check_islands(world, islands)
    except ValueError as e:
        raise ConfigError(f"--islands: {e}") from None
    if size % per_node and per_node % size:
        raise ConfigError(f"--islands={islands}: an island of {size} ranks must hold whole nodes of {per_node} "
                          f"ranks or lie inside one node; choose islands so that {size} divides {per_node} "
                          "or is a multiple of it")
    island_nodes = size // min(size, per_node)
    if CommConfig.preset(cfg.train.preset).grads == "two-level" and island_nodes < 2:
        raise ConfigError(f"preset {cfg.train.preset} reduces gradients over two levels inside an island, "
                          f"but each of the {islands} islands has {island_nodes} node: use fewer --islands, "
                          "a smaller --train.gpus_per_node, or --preset qwd")
    return islands


def make_plan(cfg: Config):
    """Resolve data, tokenizer, world size and batch layout; raise ConfigError & co on bad input."""
    from halfbyte.train.loop import RunPlan

    resume_path = _resume_path(cfg)
    launched = _launched()
    virtual = cfg.train.virtual_ranks > 0
    if virtual and launched:
        raise ConfigError("--virtual-ranks runs one process and emulates the ranks: start it without torchrun")
    world = cfg.train.virtual_ranks if virtual else int(os.environ["WORLD_SIZE"]) if launched else cfg.train.workers
    gpus_per_node = _gpus_per_node(cfg, world, launched)
    islands = _islands(cfg, world, gpus_per_node)
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
    val_ok = val_path.is_file() and (len(open_tokens(val_path)) - 1) // cfg.train.seq_len >= world
    if (len(train) - 1) // cfg.train.seq_len < world:
        raise ConfigError(f"{train_path} has {len(train)} tokens: too few for {world} workers at seq_len "
                          f"{cfg.train.seq_len}; use more data or a shorter --train.seq_len")
    if m.name.startswith("hf:"):
        hf_vocab = json.loads((Path(m.name[3:]) / "config.json").read_text()).get("vocab_size", 0)
        if train.vocab_size > hf_vocab:
            raise ConfigError(f"{train_path} uses {train.vocab_size} token ids but {m.name} has only {hf_vocab}; "
                              "prepare the data with the model's tokenizer.json")
    return RunPlan(
        cfg=cfg, train_path=str(train_path), val_path=str(val_path) if val_ok else None,
        vocab_size=train.vocab_size, tokenizer=_resolve_tokenizer(cfg, train.vocab_size, builtin, train_path),
        builtin_data=builtin, resume_path=resume_path, world_size=world, gpus_per_node=gpus_per_node,
        micro_batch=micro, accum=accum, local_workers=not launched and not virtual, virtual=virtual,
        islands=islands,
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


def train_main(argv: list[str]) -> int:
    try:
        cfg = parse_args(argv)
        if cfg is None:
            print(help_text())
            return 0
        plan = make_plan(cfg)
    except (ValueError, OSError) as e:  # ConfigError, TokenFileError, TokenizerError are ValueErrors
        if not _launched() or os.environ.get("RANK") == "0":
            return _fail("train", str(e))
        return 2

    from halfbyte.comm import WorkerError, init_process_group_from_env, spawn
    from halfbyte.train.loop import run_virtual, run_worker

    if plan.virtual:
        run_virtual(plan)  # this process; Ctrl-C / SIGTERM save a checkpoint and stop
        return 0

    if _launched():
        import torch.distributed as dist

        init_process_group_from_env(timeout_s=PG_TIMEOUT_S)
        try:
            run_worker(plan)
        finally:
            dist.destroy_process_group()
        return 0
    try:
        with _ForwardStop():
            spawn(run_worker, plan.world_size, plan, timeout_s=float("inf"), backend="gloo",
                  pg_timeout_s=PG_TIMEOUT_S)
    except WorkerError as e:
        print(f"halfbyte train: error: a worker failed, all workers stopped.\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("halfbyte train: aborted", file=sys.stderr)
        return 130
    return 0
