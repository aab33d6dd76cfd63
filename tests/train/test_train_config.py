from pathlib import Path

import pytest

from halfbyte.train.config import ALL_KEYS, Config, ConfigError, batch_layout, help_text, load_toml, parse_args

REPO = Path(__file__).resolve().parents[2]


def test_default_toml_equals_dataclass_defaults():
    cfg = Config()
    load_toml(cfg, REPO / "configs" / "default.toml")
    assert cfg == Config()
    text = (REPO / "configs" / "default.toml").read_text()
    for key, value in Config().train.__dict__.items():  # every non-None train key is spelled out
        assert f"\n{key} = " in text, key


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
    assert parse_args(["--resume", "runs/a/checkpoints/step_000010"]).train.resume.endswith("step_000010")
    assert parse_args(["--help"]) is None


def test_toml_then_overrides_in_order(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text('[train]\nsteps = 11\npreset = "qwd"\n[model]\nd_model = 128\n[optim]\nlr = 5e-4\n')
    cfg = parse_args(["--steps", "12", "--config", str(toml)])  # --config applies first wherever it is
    assert (cfg.train.steps, cfg.train.preset, cfg.model.d_model, cfg.optim.lr) == (12, "qwd", 128, 5e-4)
    assert cfg.run_name == "tiny-qwd" and cfg.out_dir == Path("runs/tiny-qwd")


@pytest.mark.parametrize("argv, message", [
    (["--foo=1"], "unknown option --foo"),
    (["--steps=x"], "--train.steps expects int"),
    (["--steps=0"], "--train.steps must be positive"),
    (["--preset", "int3"], "unknown preset 'int3'"),
    (["--model", "7b"], "unknown model '7b'"),
    (["--seq_len=512"], "exceeds the model context 128"),
    (["--config", "missing.toml"], "missing.toml does not exist"),
    (["--rope=maybe"], "expects true or false"),
    (["--lr"], "--lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--optim.min_lr=1", "--lr=0.1"], "exceeds --lr"),
    (["--train.dtype=fp8"], "unknown dtype"),
    (["--name=x"], "ambiguous"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_args(argv)


def test_bad_toml(tmp_path):
    for text, message in [("[trian]\nsteps = 1\n", r"unknown section \[trian\]"),
                          ("[train]\nstep = 1\n", "unknown key 'step'"),
                          ("[train\n", "not valid TOML")]:
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
