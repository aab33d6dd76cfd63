"""Training configuration: one tree whose sections are the components' own configs.

  [model] [data] [schedule] [train]    the trainer's (below)
  [optim]                              halfbyte.engine.AdamWConfig
  [engine]                             halfbyte.engine.config.EngineConfig
  [comm]                               halfbyte.comm.CommConfig, with its QuantSpecs nested
                                       ([comm.grad_spec] ...); `--preset` fills it, then any key of
                                       it can be overridden (`--comm.grad_spec.group_size 64`)
  [outer]                              halfbyte.engine.OuterConfig (local updates), spec nested

The defaults are `configs/default.toml`; a TOML file, then command-line overrides
(`--section.key=value`, `--key value` for keys whose last name is unique, and a few short flags)
apply on top, in that order. `--help` is generated from the tree: every option with its default and
the description its component gives (a `metadata["help"]` or its docstring's `name: text` line).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import divisors
from halfbyte.engine.config import AdamWConfig, EngineConfig
from halfbyte.engine.outer import OuterConfig
from halfbyte.train.model import PRESETS as MODEL_PRESETS

COMM_PRESETS = CommConfig.preset_names()
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("halfbyte", "fsdp2")
WEIGHT_DECAY_ON = ("matrices", "all")
DEBUG_ENV = "HALFBYTE_DEBUG"  # set to 1: errors show their traceback


class ConfigError(ValueError):
    """Bad configuration: the message names the option and the fix."""


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt("tiny", f"GPT preset ({' | '.join(MODEL_PRESETS)}) or hf:<local path> (needs transformers)")
    n_layer: int | None = opt(None, "number of layers (none: the preset's)")
    n_head: int | None = opt(None, "attention heads (none: the preset's)")
    d_model: int | None = opt(None, "model width (none: the preset's)")
    ctx: int | None = opt(None, "longest sequence the model accepts (none: the preset's)")
    rope: bool = opt(True, "rotary position embedding; false = learned absolute positions")
    dropout: float = opt(0.0, "dropout probability")


@dataclass
class DataConfig:
    path: str = opt("shakespeare", "token file from `halfbyte prepare-data`, or `shakespeare` (built-in)")
    val_path: str = opt("", "validation token file (empty: <path>.val.bin beside the training file)")
    tokenizer: str = opt("auto", "auto | builtin | gpt2 | path to tokenizer.json (used for the text sample)")


@dataclass
class ScheduleConfig:
    warmup_steps: int = opt(20, "linear warm-up steps to optim.lr")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay (the last step)")


@dataclass
class TrainConfig:
    engine: str = opt("halfbyte", "halfbyte: halfbyte's sharded data-parallel engine (ZeRO-2: each rank keeps a "
                                  "replica; [engine] applies) | fsdp2: PyTorch FSDP2, fully_shard per transformer "
                                  "block plus the root, torch.optim.AdamW, halfbyte's collectives inside it "
                                  "(bf16 weights / fp32 gradient reduction on GPU, fp32 on CPU; of [engine] "
                                  "only grad_clip applies; real ranks only: no --virtual-ranks, no --outer). "
                                  "Checkpoints of either resume in the other")
    preset: str = opt("sdp4bit", f"communication preset, fills [comm]: {' | '.join(COMM_PRESETS)}")
    steps: int = opt(500, "optimizer steps")
    batch_size: int = opt(16, "global batch size in sequences (all workers, all micro-batches)")
    micro_batch_size: int = opt(0, "sequences per worker per forward pass (0: no gradient accumulation)")
    seq_len: int = opt(128, "tokens per training sequence")
    weight_decay_on: str = opt("matrices", "which parameters --optim.weight_decay applies to: matrices (the "
                                           "weight matrices of the linear layers; none on embeddings, a tied "
                                           "output projection included, norms and biases: the GPT convention; "
                                           "an hf: model by the same rule, no decay on an nn.Embedding's weight "
                                           "or a parameter of fewer than 2 dimensions) | all (every parameter, "
                                           "one group: what runs before this option did)")
    eval_interval: int = opt(50, "evaluate validation loss every N steps (0: only at the end)")
    eval_tokens: int = opt(16384, "validation tokens per evaluation: a fixed set of windows spread over the "
                                  "whole validation file, the same for every world size")
    log_interval: int = opt(10, "write metrics every N steps")
    checkpoint_interval: int = opt(100, "save a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep")
    check_replicas_interval: int = opt(100, "every N steps verify that all ranks' replicas are bit-identical "
                                            "(one all-reduce of checksums; 0: off)")
    seed: int = opt(0, "seed for initialization, data order and stochastic rounding")
    deterministic: bool = opt(False, "deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's "
                                     "fixed workspace), so that two GPU runs of one command can retrace each "
                                     "other, at a cost in speed; an op with no deterministic kernel stops the "
                                     "run with torch's error")
    workers: int = opt(2, "local worker processes when not started by torchrun")
    virtual_ranks: int = opt(0, "emulate this many data-parallel ranks in one process, same data and "
                                "communication math as real ranks (0: off)")
    gpus_per_node: int = opt(0, "ranks per (emulated) node, for real and virtual ranks alike (0: 1 for "
                                "local workers and virtual ranks, LOCAL_WORLD_SIZE under torchrun)")
    dtype: str = opt("auto", f"compute dtype: {' | '.join(DTYPES)} (auto: bf16 on GPU, fp32 on CPU)")
    device: str = opt("auto", f"where virtual ranks run: {' | '.join(DEVICES)} (auto: the GPU if there is one)")
    name: str = opt("", "run name (empty: <model>-<preset>)")
    out_dir: str = opt("", "output directory (empty: runs/<name>); a new run refuses a directory that "
                           "holds another run")
    resume: str = opt("", "auto (continue the run in out_dir if it has a checkpoint, else start), latest "
                          "(its newest checkpoint, which must exist), or a checkpoint directory")
    overwrite: bool = opt(False, "start anew in an out_dir that holds an earlier run; the earlier run is "
                                 "deleted only once the new run's first checkpoint is saved")
    replan: bool = opt(False, "on --resume, allow a new --train.steps: the learning rate decays from the "
                              "value it reached at the resumed step to min_lr at the new last step")
    sample_tokens: int = opt(200, "tokens of text to generate at the end (0: none)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": AdamWConfig, "schedule": ScheduleConfig,
    "engine": EngineConfig, "comm": CommConfig, "outer": OuterConfig, "train": TrainConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: AdamWConfig = field(default_factory=lambda: AdamWConfig(lr=4e-3))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    comm: CommConfig = field(default_factory=lambda: CommConfig.preset("sdp4bit"))
    outer: OuterConfig = field(default_factory=lambda: OuterConfig("none"))
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{self.model.name.replace('/', '_').replace(':', '-')}-{self.train.preset}"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or Path("runs") / self.run_name)

    def to_dict(self) -> dict[str, Any]:
        return to_tree(self)


SHORT_FLAGS = {
    "config": "config", "preset": "train.preset", "steps": "train.steps", "workers": "train.workers",
    "seed": "train.seed", "out": "train.out_dir", "resume": "train.resume", "model": "model.name",
    "data": "data.path", "tokenizer": "data.tokenizer", "batch-size": "train.batch_size", "lr": "optim.lr",
    "virtual-ranks": "train.virtual_ranks", "virtual-gpus-per-node": "train.gpus_per_node",
    "outer": "outer.optimizer", "local-steps": "outer.local_steps", "islands": "outer.islands",
    "outer-lr": "outer.lr", "outer-bits": "outer.spec.bits", "overwrite": "train.overwrite",
    "engine": "train.engine",
}
# Options whose change alters what a run computes: a resume refuses a new value (train.steps only
# with --train.replan). Everything else (workers, virtual ranks, buckets, intervals) is a reshard
# or bookkeeping, and may change; so may train.engine (the checkpoint layout is the same: the other
# engine continues the run).
MEANING = ("model", "data.path", "optim", "schedule", "comm", "outer", "engine.grad_clip", "train.preset",
           "train.steps", "train.batch_size", "train.seq_len", "train.seed", "train.dtype", "train.weight_decay_on")


# ---- the tree ---------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(typ: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None`."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def _is_config(typ: Any) -> bool:
    return dataclasses.is_dataclass(typ) and isinstance(typ, type)


def field_docs(cls: type) -> dict[str, str]:
    """`name: text` descriptions from a dataclass's docstring (continuation lines joined)."""
    docs: dict[str, str] = {}
    current = None
    names = {f.name for f in dataclasses.fields(cls)}
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"\s*(\w+):\s+(.*)", line)
        if m and m.group(1) in names:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def to_tree(obj: Any) -> Any:
    """A config object as nested plain dicts (tuples as lists), e.g. for config.json."""
    if _is_config(type(obj)):
        return {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_tree(v) for v in obj]
    return obj


def leaves(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field, type]]:
    """Every settable key under `cls`: dotted path -> (type, field, owning class). A nested config
    field (`comm.grad_spec`) is itself settable (to none, when optional) and has leaves below it."""
    out: dict[str, tuple[Any, dataclasses.Field, type]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        inner, _ = _optional(hints[f.name])
        out[path] = (hints[f.name], f, cls)
        if _is_config(inner):
            out |= leaves(inner, path + ".")
    return out


ALL_KEYS = {f"{s}.{k}": v for s, cls in SECTIONS.items() for k, v in leaves(cls).items()}


def _convert(key: str, typ: Any, value: Any) -> Any:
    """A TOML or command-line value as the field's type (nested configs stay dicts here)."""
    inner, nullable = _optional(typ)
    if value is None or (nullable and isinstance(value, str) and value.lower() in ("none", "null")):
        if nullable:
            return None
        raise ConfigError(f"--{key} cannot be none")
    if _is_config(inner):
        if isinstance(value, dict):
            return value
        raise ConfigError(f"--{key} is a section: set its keys (--{key}.<name>) or none")
    if typing.get_origin(inner) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(typing.get_args(inner)):
            raise ConfigError(f"--{key} expects {len(typing.get_args(inner))} comma-separated numbers, got {value!r}")
        return [_convert(key, t, v) for t, v in zip(typing.get_args(inner), items)]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {value!r}")
    if inner is int:
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"--{key} expects int, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or number != int(number):
            raise ConfigError(f"--{key} expects an integer, got {value!r}")
        return int(number)
    if inner is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key} expects float, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"--{key} must be a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"--{key} expects text, got {value!r}")
    return value


def _template(typ: Any, f: dataclasses.Field) -> dict[str, Any]:
    """The values an unset optional section starts from when one of its keys is given."""
    inner, _ = _optional(typ)
    return to_tree(f.metadata.get("template") or inner())


def set_value(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in the nested dict tree, creating an optional section from its template."""
    parts = key.split(".")
    node = tree
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        child = node.get(parts[depth - 1])
        if child is None:  # an optional section that is off: its keys start from the template
            typ, f, _ = ALL_KEYS[name]
            child = node[parts[depth - 1]] = _template(typ, f)
        node = child
    typ, _, _ = ALL_KEYS[key]
    node[parts[-1]] = _convert(key, typ, value)


def build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    """The config object of `cls` from its nested dict; ConfigError names the section."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        value, (inner, _) = tree[f.name], _optional(hints[f.name])
        if _is_config(inner) and isinstance(value, dict):
            value = build(inner, value, f"{prefix}{f.name}.")
        elif typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        section = prefix.rstrip(".")
        raise ConfigError(f"[{section}]: {e}") from None


def _resolve_key(name: str) -> str:
    """`steps` / `batch-size` (short flags), `train.steps` or a unique last name -> the dotted key."""
    if name in SHORT_FLAGS:
        return SHORT_FLAGS[name]
    name = name.replace("-", "_")
    if name in ALL_KEYS:
        return name
    matches = [k for k in ALL_KEYS if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"option --{name} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    raise ConfigError(f"unknown option --{name}; `halfbyte train --help` lists every option")


def _flatten_toml(table: dict[str, Any], path: Path, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for name, value in table.items():
        key = f"{prefix}{name}"
        if key not in ALL_KEYS and not (prefix == "" and name in SECTIONS):
            where = f"[{prefix.rstrip('.')}]" if prefix else "the file"
            if prefix == "":
                raise ConfigError(f"{path}: unknown section [{name}]; use [{'], ['.join(SECTIONS)}]")
            raise ConfigError(f"{path}: unknown key {name!r} in {where}; see `halfbyte train --help`")
        if prefix == "" and not isinstance(value, dict):  # `train = 3`: a section needs a table
            raise ConfigError(f"{path}: {name} is a section: set its keys in a [{name}] table")
        if isinstance(value, dict):
            items += _flatten_toml(value, path, key + ".")
        else:
            items.append((key, value))
    return items


def read_toml(path: str | Path) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of a TOML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config file.toml")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return _flatten_toml(table, path)


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]] | None:
    """(dotted key, value) pairs in the order they apply: --config's first, then the others. None
    means --help was asked for."""
    overrides: list[tuple[str, Any]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --train.steps=100")
        name, has_value, value = arg[2:].partition("=")
        key = _resolve_key(name)
        if not has_value:
            takes_flag = key == "train.resume" or (key in ALL_KEYS and ALL_KEYS[key][0] is bool)
            if i + 1 < len(argv) and not (takes_flag and argv[i + 1].startswith("--")):
                value, i = argv[i + 1], i + 1
            elif takes_flag:
                value = "latest" if key == "train.resume" else "true"
            else:
                raise ConfigError(f"option --{name} needs a value, e.g. --{name}=VALUE")
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value))
        i += 1
    return (read_toml(config_file) if config_file is not None else []) + overrides


def make_config(overrides: list[tuple[str, Any]], base: dict[str, Any] | None = None) -> Config:
    """The Config of `base` (a tree, default: the defaults) with `overrides` applied in order. The
    last train.preset given fills [comm] first; every [comm] key given applies on top of it."""
    tree = base if base is not None else to_tree(Config())
    presets = [v for k, v in overrides if k == "train.preset"]
    if presets:
        name = str(presets[-1])
        if name not in COMM_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; use --preset {' | '.join(COMM_PRESETS)}")
        tree["comm"] = to_tree(CommConfig.preset(name))
    for key, value in overrides:
        set_value(tree, key, value)
    return Config(**{name: build(cls, tree[name], f"{name}.") for name, cls in SECTIONS.items()})


def parse_args(argv: list[str]) -> Config | None:
    """Config from defaults < --config TOML < overrides (in order). None means --help was asked for."""
    overrides = parse_overrides(argv)
    if overrides is None:
        return None
    cfg = make_config(overrides)
    validate(cfg, {k for k, _ in overrides})
    return cfg


def changed_meaning(saved: Config, now: Config) -> list[str]:
    """The MEANING keys whose value differs between two configs (dotted keys)."""
    a, b = _flat(to_tree(saved)), _flat(to_tree(now))
    return [k for k in sorted(set(a) | set(b))
            if any(k == m or k.startswith(m + ".") for m in MEANING) and a.get(k) != b.get(k)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- checks -----------------------------------------------------------------------------------------
def validate(cfg: Config, given: set[str] = frozenset()) -> None:
    """Checks that need no data, no model and no processes. given: the keys set explicitly."""
    m, t, s = cfg.model, cfg.train, cfg.schedule
    if not m.name.startswith("hf:") and m.name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {m.name!r}; use --model {' | '.join(MODEL_PRESETS)} or hf:<local path>")
    if not cfg.data.path.strip():
        raise ConfigError("--data is empty; name a token file from `halfbyte prepare-data`, or shakespeare")
    if t.preset not in COMM_PRESETS:
        raise ConfigError(f"unknown preset {t.preset!r}; use --preset {' | '.join(COMM_PRESETS)}")
    if t.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {t.dtype!r}; use --train.dtype {' | '.join(DTYPES)}")
    if t.device not in DEVICES:
        raise ConfigError(f"unknown device {t.device!r}; use --train.device {' | '.join(DEVICES)}")
    if t.engine not in ENGINES:
        raise ConfigError(f"unknown engine {t.engine!r}; use --engine {' | '.join(ENGINES)}")
    if t.weight_decay_on not in WEIGHT_DECAY_ON:
        raise ConfigError(f"unknown --train.weight_decay_on {t.weight_decay_on!r}; use "
                          f"{' | '.join(WEIGHT_DECAY_ON)}")
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
                "train.workers": t.workers, "train.eval_tokens": t.eval_tokens, "train.log_interval": t.log_interval,
                "train.keep_checkpoints": t.keep_checkpoints, "optim.lr": cfg.optim.lr}
    positive |= {f"model.{k}": v for k, v in
                 (("n_layer", m.n_layer), ("n_head", m.n_head), ("d_model", m.d_model), ("ctx", m.ctx))
                 if v is not None}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key} must be positive, got {value}")
    non_negative = {"train.micro_batch_size": t.micro_batch_size, "train.eval_interval": t.eval_interval,
                    "train.checkpoint_interval": t.checkpoint_interval, "train.gpus_per_node": t.gpus_per_node,
                    "train.sample_tokens": t.sample_tokens, "schedule.min_lr": s.min_lr,
                    "schedule.warmup_steps": s.warmup_steps, "train.check_replicas_interval": t.check_replicas_interval}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{key} must be >= 0, got {value}")
    if not 0 <= t.seed < 2**63:  # numpy's generators refuse a negative seed, torch one of 2**64 or more
        raise ConfigError(f"--train.seed must be in [0, 2**63), got {t.seed}")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"--model.dropout must be in [0, 1), got {m.dropout}")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(f"--train.eval_tokens={t.eval_tokens} is less than one sequence of --train.seq_len="
                          f"{t.seq_len}; raise eval_tokens")
    if s.min_lr > cfg.optim.lr:
        raise ConfigError(f"--schedule.min_lr={s.min_lr} exceeds --lr={cfg.optim.lr}; lower min_lr")
    if t.resume and t.overwrite:
        raise ConfigError("--resume continues the run in out_dir and --overwrite replaces it: choose one")
    if t.resume and t.resume not in ("auto", "latest") and not Path(t.resume).is_dir():
        raise ConfigError(f"--resume {t.resume}: no such checkpoint directory; use --resume auto or latest "
                          "for the run in out_dir")
    _validate_parallelism(cfg, given)
    if not m.name.startswith("hf:"):
        ctx = m.ctx or MODEL_PRESETS[m.name][3]
        if t.seq_len > ctx:
            raise ConfigError(f"--train.seq_len={t.seq_len} exceeds the model context {ctx}; "
                              f"lower seq_len or raise --model.ctx")


def _validate_parallelism(cfg: Config, given: set[str]) -> None:
    """Virtual ranks and local updates: the checks that need no world size."""
    t = cfg.train
    if t.engine == "fsdp2" and t.virtual_ranks:
        raise ConfigError(f"--engine fsdp2 runs real ranks (local workers or torchrun): drop --virtual-ranks="
                          f"{t.virtual_ranks}, or use --engine halfbyte to emulate them")
    if t.engine == "fsdp2" and cfg.outer.enabled:
        raise ConfigError(f"--engine fsdp2 does not run local updates (--outer {cfg.outer.optimizer}): use "
                          "--engine halfbyte for them")
    if t.virtual_ranks < 0:
        raise ConfigError(f"--virtual-ranks must be >= 1 (or 0: off), got {t.virtual_ranks}")
    if t.device != "auto" and not t.virtual_ranks:
        raise ConfigError(f"--train.device={t.device} chooses where virtual ranks run: use it with --virtual-ranks "
                          "(local workers run on the CPU, torchrun ranks on their GPU)")
    if t.virtual_ranks:
        if "train.workers" in given and t.workers > 1:
            raise ConfigError(f"--virtual-ranks={t.virtual_ranks} runs one process: drop --workers={t.workers} "
                              "(virtual ranks replace local workers)")
        if cfg.model.dropout > 0:
            raise ConfigError(f"--virtual-ranks needs --model.dropout=0 (got {cfg.model.dropout}): one process "
                              "draws the dropout masks of all virtual ranks from one random stream, so it "
                              "would not reproduce W real ranks")
        if t.gpus_per_node and t.virtual_ranks % t.gpus_per_node:
            raise ConfigError(f"--virtual-gpus-per-node={t.gpus_per_node} does not divide --virtual-ranks="
                              f"{t.virtual_ranks}; use one of {divisors(t.virtual_ranks)}")


def batch_layout(cfg: Config, world_size: int, ranks: str = "workers") -> tuple[int, int]:
    """(micro-batch size per rank, accumulation steps), or ConfigError if the global batch does not split."""
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size // world_size
    if micro == 0 or t.batch_size % (world_size * micro):
        raise ConfigError(
            f"--batch-size={t.batch_size} is not divisible by {ranks} x micro-batch = {world_size} x "
            f"{t.micro_batch_size or micro}; use a batch size that is a multiple of {world_size * max(micro, 1)}"
        )
    return micro, t.batch_size // (world_size * micro)


def help_text() -> str:
    lines = [
        "usage: halfbyte train [--config file.toml] [--section.key=value ...]",
        "",
        "Trains a GPT with sharded data parallelism and 4-bit communication, on halfbyte's engine or on",
        "PyTorch FSDP2 (--engine fsdp2: halfbyte's collectives inside fully_shard). Without a launcher it starts",
        "--workers local CPU processes (gloo), each its own emulated node; under torchrun it uses the",
        "launcher's ranks (NCCL on GPUs). --virtual-ranks W emulates W ranks in this one process (GPU if",
        "available) with the data order and communication math of W real ranks. --outer turns on local",
        "updates: islands of ranks train on their own and meet every --local-steps steps (an outer step).",
        "Options apply in order: defaults (configs/default.toml), then --config, then the others.",
        "Keys may be written without their sections when their last name is unique. --preset fills",
        "[comm]; its keys can then be overridden (e.g. --comm.grad_spec.group_size 64).",
        "A mistake is one line on stderr and exit code 2; set HALFBYTE_DEBUG=1 to see the traceback.",
        "",
        f"  --config FILE                  TOML file with [{'] ['.join(SECTIONS)}] tables",
        "short flags:",
        *(f"  --{k:<28} = --{v}" for k, v in SHORT_FLAGS.items() if k != "config"),
    ]
    defaults = Config()
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        for key, (typ, f, owner) in leaves(cls, f"{section}.").items():
            text = f.metadata.get("help") or field_docs(owner).get(f.name, "")
            value: Any = defaults
            for part in key.split("."):
                value = None if value is None else getattr(value, part)
            if _is_config(_optional(typ)[0]):
                default = "none" if value is None else "on"
                text = f"{text} (a section: set its keys below, or none)"
            else:
                default = "none" if value is None else repr(value)
            lines.append(f"  {'--' + key:<34} {text} (default: {default})")
    return "\n".join(lines)
