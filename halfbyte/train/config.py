"""Training configuration: dataclasses (their defaults are `configs/default.toml`), TOML files, and
command-line overrides (`--section.key=value`, `--key value` for unique keys, and a few short flags).
`--help` is generated from the dataclasses, so it always lists every option with its default."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from halfbyte.comm import divisors
from halfbyte.engine import CommConfig
from halfbyte.train.model import PRESETS as MODEL_PRESETS

COMM_PRESETS = CommConfig.preset_names()
OUTER_CHOICES = ("none", "sign-momentum", "nesterov", "average")
DTYPES = ("auto", "fp32", "bf16")


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
class OptimConfig:
    lr: float = opt(4e-3, "peak learning rate")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(20, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")


@dataclass
class TrainConfig:
    preset: str = opt("sdp4bit", f"communication preset: {' | '.join(COMM_PRESETS)}")
    steps: int = opt(500, "optimizer steps")
    batch_size: int = opt(16, "global batch size in sequences (all workers, all micro-batches)")
    micro_batch_size: int = opt(0, "sequences per worker per forward pass (0: no gradient accumulation)")
    seq_len: int = opt(128, "tokens per training sequence")
    eval_interval: int = opt(50, "evaluate validation loss every N steps (0: only at the end)")
    eval_tokens: int = opt(16384, "validation tokens per evaluation: a fixed set of windows spread over the "
                                   "whole validation file, the same for every world size")
    log_interval: int = opt(10, "write metrics every N steps")
    checkpoint_interval: int = opt(100, "save a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep")
    check_replicas_interval: int = opt(100, "every N steps verify that all ranks' replicas are bit-identical "
                                            "(one all-reduce of checksums; 0: off)")
    seed: int = opt(0, "seed for initialization, data order and stochastic rounding")
    workers: int = opt(2, "local worker processes when not started by torchrun")
    virtual_ranks: int = opt(0, "emulate this many data-parallel ranks in one process, same data and "
                                "communication math as real ranks (0: off)")
    gpus_per_node: int = opt(0, "ranks per (emulated) node, for real and virtual ranks alike (0: 1 for "
                                "local workers and virtual ranks, LOCAL_WORLD_SIZE under torchrun; a "
                                "one-node torchrun job with a two-level preset runs 1 per node)")
    dtype: str = opt("auto", f"compute dtype: {' | '.join(DTYPES)} (auto: bf16 on GPU, fp32 on CPU)")
    name: str = opt("", "run name (empty: <model>-<preset>)")
    out_dir: str = opt("", "output directory (empty: runs/<name>)")
    resume: str = opt("", "checkpoint directory to resume from, or `latest` (the newest in out_dir)")
    sample_tokens: int = opt(200, "tokens of text to generate at the end (0: none)")
    bucket_numel: int = opt(25_000_000, "values per communication bucket")


@dataclass
class LocalUpdatesConfig:
    """Local updates (halfbyte.engine.local): defaults are the engine's, i.e. the sign-momentum paper's
    (Yu et al. 2024, authors' code) and DiLoCo's for nesterov."""

    optimizer: str = opt("none", f"outer optimizer across islands: {' | '.join(OUTER_CHOICES)} (none: every "
                                 "step synchronous data parallel)")
    local_steps: int = opt(12, "tau: inner steps between outer steps")
    islands: int = opt(0, "islands of consecutive ranks (0: one per (emulated) node)")
    lr: float | None = opt(None, "outer learning rate (none: sign-momentum 1.0 x inner lr, nesterov 0.7, average 1.0)")
    beta1: float = opt(0.95, "sign-momentum: beta1 of the update direction")
    beta2: float = opt(0.98, "sign-momentum: beta2 of the momentum")
    momentum: float = opt(0.9, "nesterov: momentum")
    weight_decay: float | None = opt(None, "sign-momentum: decoupled weight decay (none: 0.2; others: 0)")
    bits: int = opt(0, "pseudo-gradient exchange across islands: 0 (fp32, exact) | 4 | 8")
    group_size: int = opt(128, "values per quantization group of the exchange")
    hadamard: int = opt(32, "Hadamard block of the exchange (0: off)")
    rounding: str = opt("stochastic", "rounding of the exchange: stochastic | nearest")
    error_feedback: bool = opt(True, "keep the exchange's quantization residual and add it to the next one")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none"

    def engine_config(self) -> Any:
        """The engine's OuterConfig (raises ValueError on bad values)."""
        from halfbyte.engine.local import OuterConfig as EngineOuterConfig
        from halfbyte.quant import QuantSpec

        spec = None if not self.bits else QuantSpec(bits=self.bits, group_size=self.group_size,
                                                     rounding=self.rounding, hadamard=self.hadamard)
        return EngineOuterConfig(self.optimizer, local_steps=self.local_steps, lr=self.lr,
                                 betas=(self.beta1, self.beta2), momentum=self.momentum,
                                 weight_decay=self.weight_decay, spec=spec, error_feedback=self.error_feedback)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: LocalUpdatesConfig = field(default_factory=LocalUpdatesConfig)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{self.model.name.replace('/', '_').replace(':', '-')}-{self.train.preset}"

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or Path("runs") / self.run_name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "outer": LocalUpdatesConfig}
SHORT_FLAGS = {
    "config": "config", "preset": "train.preset", "steps": "train.steps", "workers": "train.workers",
    "seed": "train.seed", "out": "train.out_dir", "resume": "train.resume", "model": "model.name",
    "data": "data.path", "tokenizer": "data.tokenizer", "batch-size": "train.batch_size", "lr": "optim.lr",
    "virtual-ranks": "train.virtual_ranks", "virtual-gpus-per-node": "train.gpus_per_node",
    "outer": "outer.optimizer", "local-steps": "outer.local_steps", "islands": "outer.islands",
    "outer-lr": "outer.lr", "outer-bits": "outer.bits",
}


def _section_fields(section: str) -> dict[str, tuple[Any, dataclasses.Field]]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


ALL_KEYS = {f"{s}.{name}": typ for s in SECTIONS for name, (typ, _) in _section_fields(s).items()}


def _convert(key: str, typ: Any, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # `int | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {value!r}")
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"--{key} expects an integer, got {value!r}")
    try:
        return typ(int(float(value)) if typ is int and isinstance(value, str) and "e" in value.lower() else value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key} expects {typ.__name__}, got {value!r}") from None


def _resolve_key(name: str) -> str:
    """`steps` / `batch-size` (short flags), `train.steps` or a unique field name -> `section.field`."""
    if name in SHORT_FLAGS:
        return SHORT_FLAGS[name]
    name = name.replace("-", "_")
    if name in ALL_KEYS:
        return name
    matches = [k for k in ALL_KEYS if k.split(".", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"option --{name} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    raise ConfigError(f"unknown option --{name}; `halfbyte train --help` lists every option")


def set_value(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _convert(key, ALL_KEYS[key], value))


def load_toml(cfg: Config, path: str | Path) -> set[str]:
    """Apply a TOML file to cfg; returns the keys it set."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing --config file.toml")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for section, values in table.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}]; use [{'], ['.join(SECTIONS)}]")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in ALL_KEYS:
                raise ConfigError(f"{path}: unknown key {name!r} in [{section}]; see `halfbyte train --help`")
            set_value(cfg, key, value)
    return {f"{section}.{name}" for section, values in table.items() for name in values}


def parse_args(argv: list[str]) -> Config | None:
    """Config from defaults < --config TOML < overrides (in order). None means --help was asked for."""
    overrides: list[tuple[str, str]] = []
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
            takes_flag = key == "train.resume" or (key in ALL_KEYS and ALL_KEYS[key] is bool)
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
    cfg = Config()
    given = {key for key, _ in overrides}
    if config_file is not None:
        given |= load_toml(cfg, config_file)
    for key, value in overrides:
        set_value(cfg, key, value)
    validate(cfg, given)
    return cfg


def validate(cfg: Config, given: set[str] = frozenset()) -> None:
    """Checks that need no data, no model and no processes. given: the keys set explicitly."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    if not m.name.startswith("hf:") and m.name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {m.name!r}; use --model {' | '.join(MODEL_PRESETS)} or hf:<local path>")
    if t.preset not in COMM_PRESETS:
        raise ConfigError(f"unknown preset {t.preset!r}; use --preset {' | '.join(COMM_PRESETS)}")
    if t.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {t.dtype!r}; use --train.dtype {' | '.join(DTYPES)}")
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
                "train.workers": t.workers, "train.eval_tokens": t.eval_tokens, "train.log_interval": t.log_interval,
                "train.keep_checkpoints": t.keep_checkpoints, "optim.lr": o.lr, "train.bucket_numel": t.bucket_numel}
    positive |= {f"model.{k}": v for k, v in
                 (("n_layer", m.n_layer), ("n_head", m.n_head), ("d_model", m.d_model), ("ctx", m.ctx))
                 if v is not None}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key} must be positive, got {value}")
    non_negative = {"train.micro_batch_size": t.micro_batch_size, "train.eval_interval": t.eval_interval,
                    "train.checkpoint_interval": t.checkpoint_interval, "train.gpus_per_node": t.gpus_per_node,
                    "train.sample_tokens": t.sample_tokens, "optim.min_lr": o.min_lr,
                    "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                    "optim.grad_clip": o.grad_clip, "model.dropout": m.dropout}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{key} must be >= 0, got {value}")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(f"--train.eval_tokens={t.eval_tokens} is less than one sequence of --train.seq_len="
                          f"{t.seq_len}; raise eval_tokens")
    if o.min_lr > o.lr:
        raise ConfigError(f"--optim.min_lr={o.min_lr} exceeds --lr={o.lr}; lower min_lr")
    _validate_parallelism(cfg, given)
    if not m.name.startswith("hf:"):
        ctx = m.ctx or MODEL_PRESETS[m.name][3]
        if t.seq_len > ctx:
            raise ConfigError(f"--train.seq_len={t.seq_len} exceeds the model context {ctx}; "
                              f"lower seq_len or raise --model.ctx")


def _validate_parallelism(cfg: Config, given: set[str]) -> None:
    """Virtual ranks and local updates: the checks that need no world size."""
    t, u = cfg.train, cfg.outer
    if t.virtual_ranks < 0:
        raise ConfigError(f"--virtual-ranks must be >= 1 (or 0: off), got {t.virtual_ranks}")
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
    if u.optimizer not in OUTER_CHOICES:
        raise ConfigError(f"unknown outer optimizer {u.optimizer!r}; use --outer {' | '.join(OUTER_CHOICES)}")
    if not u.enabled:
        return
    if u.local_steps < 1:
        raise ConfigError(f"--local-steps (tau) must be >= 1, got {u.local_steps}")
    if u.islands < 0:
        raise ConfigError(f"--islands must be >= 1 (or 0: one per node), got {u.islands}")
    if u.bits not in (0, 4, 8):
        raise ConfigError(f"--outer-bits must be 0 (fp32), 4 or 8, got {u.bits}")
    if u.rounding not in ("nearest", "stochastic"):
        raise ConfigError(f"--outer.rounding must be nearest or stochastic, got {u.rounding!r}")
    if u.weight_decay and u.optimizer != "sign-momentum":
        raise ConfigError(f"--outer.weight_decay is only used by --outer sign-momentum; drop it for {u.optimizer}")
    try:
        u.engine_config()
    except ValueError as e:  # the engine's own checks (lr, betas, momentum, codec)
        raise ConfigError(f"--outer options: {e}") from None


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
        "Trains a GPT with sharded data parallelism and 4-bit communication. Without a launcher it starts",
        "--workers local CPU processes (gloo), each its own emulated node; under torchrun it uses the",
        "launcher's ranks (NCCL on GPUs). --virtual-ranks W emulates W ranks in this one process (GPU if",
        "available) with the data order and communication math of W real ranks. --outer turns on local",
        "updates: islands of ranks train on their own and meet every --local-steps steps (an outer step).",
        "Options apply in order: defaults (configs/default.toml), then --config, then the others.",
        "Keys may be written without their section when unique.",
        "",
        "  --config FILE                  TOML file with [model] [data] [optim] [train] [outer] tables",
        "short flags:",
        *(f"  --{k:<28} = --{v}" for k, v in SHORT_FLAGS.items() if k != "config"),
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for name, (_, f) in _section_fields(section).items():
            default = "none" if f.default is None else repr(f.default)
            lines.append(f"  {'--' + section + '.' + name:<30} {f.metadata['help']} (default: {default})")
    return "\n".join(lines)
