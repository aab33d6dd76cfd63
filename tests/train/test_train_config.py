import re
from pathlib import Path

import pytest

from halfbyte.comm import CommConfig
from halfbyte.quant import QuantSpec
from halfbyte.train.config import (
    ALL_KEYS,
    Config,
    ConfigError,
    batch_layout,
    changed_meaning,
    help_text,
    make_config,
    parse_args,
    read_toml,
)

REPO = Path(__file__).resolve().parents[2]


def test_default_toml_equals_dataclass_defaults():
    cfg = make_config(read_toml(REPO / "configs" / "default.toml"))
    assert cfg == Config()
    text = (REPO / "configs" / "default.toml").read_text()
    tables = {chunk.split("]", 1)[0]: chunk for chunk in text.split("\n[")[1:]}
    for section, value in Config().__dict__.items():  # every non-None key is spelled out in its table
        if section == "comm":  # filled by train.preset, as the file's header says
            continue
        for key, default in value.__dict__.items():
            assert default is None or f"\n{key} = " in tables[section], f"[{section}] {key}"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_every_shipped_config_parses(name):
    assert parse_args(["--config", str(REPO / "configs" / name)]) is not None


def test_overrides_short_dotted_and_unique_keys():
    cfg = parse_args(["--steps", "7", "--lr=1e-3", "--train.eval_interval=3", "--n_layer", "2",
                      "--batch-size", "64", "--preset", "baseline", "--model.rope", "false", "--out", "x/y"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.eval_interval) == (7, 1e-3, 3)
    assert (cfg.model.n_layer, cfg.train.batch_size, cfg.train.preset) == (2, 64, "baseline")
    assert cfg.model.rope is False and cfg.out_dir == Path("x/y")
    assert parse_args(["--resume"]).train.resume == "latest"
    assert parse_args(["--resume", "--steps=3"]).train.resume == "latest"
    assert parse_args(["--resume", "auto"]).train.resume == "auto"
    assert parse_args(["--resume", str(REPO / "configs")]).train.resume.endswith("configs")  # an existing dir
    assert parse_args(["--help"]) is None


def test_toml_then_overrides_in_order(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text('[train]\nsteps = 11\npreset = "qwd"\n[model]\nd_model = 128\n[optim]\nlr = 5e-4\n')
    cfg = parse_args(["--steps", "12", "--config", str(toml)])  # --config applies first wherever it is
    assert (cfg.train.steps, cfg.train.preset, cfg.model.d_model, cfg.optim.lr) == (12, "qwd", 128, 5e-4)
    assert cfg.comm == CommConfig.preset("qwd")  # the preset filled [comm]
    assert cfg.run_name == "tiny-qwd" and cfg.out_dir == Path("runs/tiny-qwd")


@pytest.mark.parametrize("argv, message", [
    (["--foo=1"], "unknown option --foo"),
    (["--steps=x"], "--train.steps expects int"),
    (["--steps=0"], "--train.steps must be positive"),
    (["--data", ""], "--data is empty"),  # it said "data file . is a directory"
    (["--preset", "int3"], "unknown preset 'int3'"),
    (["--model", "7b"], "unknown model '7b'"),
    (["--seq_len=512"], "exceeds the model context 128"),
    (["--config", "missing.toml"], "missing.toml does not exist"),
    (["--rope=maybe"], "expects true or false"),
    (["--lr"], "--lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--schedule.min_lr=1", "--lr=0.1"], "exceeds --lr"),
    (["--lr=nan"], "must be a finite number"),
    (["--lr", "inf"], "must be a finite number"),
    (["--optim.betas", "0.9"], "expects 2 comma-separated numbers"),
    (["--optim.betas", "0.9,1.5"], "[optim]: AdamWConfig.betas must be two values in [0, 1)"),
    (["--comm.grad_spec.bits", "3"], "[comm.grad_spec]: QuantSpec.bits must be 2, 4 or 8, got 3"),
    (["--preset", "baseline", "--comm.weight_spec.bits", "8"], "[comm]: CommConfig.weight_spec is only used"),
    (["--bits", "8"], "ambiguous"),
    (["--outer", "adam"], "OuterConfig.optimizer must be one of"),
    (["--engine.grad_clip", "-1"], "EngineConfig.grad_clip must be"),
    (["--steps=1e400"], "expects an integer"),
    (["--resume", "--overwrite"], "choose one"),
    (["--resume", "no/such/dir"], "--resume no/such/dir: no such checkpoint directory"),
    (["--train.dtype=fp8"], "unknown dtype"),
    (["--name=x"], "ambiguous"),
    (["--seed", "-1"], "--train.seed must be in [0, 2**63), got -1"),  # a worker's traceback before
    (["--seed", "1e20"], "--train.seed must be in [0, 2**63), got 100000000000000000000"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)


def test_bad_toml(tmp_path):
    for text, message in [("[trian]\nsteps = 1\n", r"unknown section \[trian\]"),
                          ("[train]\nstep = 1\n", "unknown key 'step'"),
                          ("[comm.grad_spec]\nbitz = 4\n", r"unknown key 'bitz' in \[comm.grad_spec\]"),
                          ("[train\n", "not valid TOML"),
                          ("train = 3\n", r"train is a section: set its keys in a \[train\] table")]:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_args(["--config", str(tmp_path / "bad.toml")])


def test_batch_layout():
    cfg = parse_args(["--batch-size", "32"])
    assert batch_layout(cfg, 2) == (16, 1)
    cfg.train.micro_batch_size = 4
    assert batch_layout(cfg, 2) == (4, 4)
    cfg.train.micro_batch_size = 5
    with pytest.raises(ConfigError, match="not divisible by workers x micro-batch = 2 x 5"):
        batch_layout(cfg, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        batch_layout(parse_args(["--batch-size", "3"]), 2)


def test_help_lists_every_option_with_its_default():
    text = help_text()
    for key in ALL_KEYS:
        line = next(l for l in text.splitlines() if l.strip().startswith(f"--{key} "))
        assert "(default: " in line
    assert "(default: 'sdp4bit')" in text and "--batch-size" in text
    # the components' own descriptions reach --help (QuantSpec's and CommConfig's docstrings)
    assert "--comm.grad_spec.group_size" in text and "consecutive values sharing one scale" in text
    assert "HALFBYTE_DEBUG" in text


def test_preset_fills_comm_and_single_codec_keys_override_it():
    """--preset is sugar for [comm]; a key of it given on the command line or in TOML applies on top,
    whatever the order, and an optional spec that is off starts from its template."""
    cfg = parse_args(["--comm.grad_spec.group_size", "64", "--preset", "zeropp"])
    assert cfg.comm.grad_spec == QuantSpec(bits=4, group_size=64, rounding="nearest")
    assert cfg.comm.grad_intra_spec == CommConfig.preset("zeropp").grad_intra_spec
    assert parse_args(["--outer", "nesterov", "--outer-bits", "8"]).outer.spec == QuantSpec(
        bits=8, group_size=128, rounding="stochastic", hadamard=32)
    assert parse_args(["--outer", "nesterov", "--outer.spec", "none"]).outer.spec is None
    assert parse_args(["--optim.betas", "0.8,0.9"]).optim.betas == (0.8, 0.9)
    assert parse_args(["--grad_clip", "0"]).engine.grad_clip is None


def test_changed_meaning_names_what_changes_a_run_and_ignores_layout():
    base = parse_args([])
    assert changed_meaning(base, parse_args(["--workers", "4", "--bucket_numel", "9", "--log_interval", "3"])) == []
    assert changed_meaning(base, parse_args(["--virtual-ranks", "8"])) == []
    assert changed_meaning(base, parse_args(["--steps", "9"])) == ["train.steps"]
    assert "comm.grad_spec.group_size" in changed_meaning(base, parse_args(["--comm.grad_spec.group_size", "64"]))
    assert changed_meaning(base, parse_args(["--model.n_layer", "2"])) == ["model.n_layer"]
