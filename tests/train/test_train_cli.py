"""`halfbyte train` on bad input: exit code 2 and one line naming the problem, before any worker starts."""

import importlib.util

import numpy as np
import pytest

import halfbyte.train.cli
from halfbyte.cli import main
from halfbyte.train.data import TokenWriter


@pytest.fixture
def no_workers(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(halfbyte.train.cli, "spawn", refuse)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def token_file(tmp_path):
    w = TokenWriter(tmp_path / "tok.bin", 4096)
    w.write(np.arange(5000) % 4096)
    return w.close()


def _fails(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the built-in corpus may print its one-time tokenization progress first
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("halfbyte train: error: ") and message in errors[0], err


@pytest.mark.parametrize("args, message", [
    (["--preset", "int2"], "unknown preset 'int2'; use --preset baseline"),
    (["--model", "13b"], "unknown model '13b'"),
    (["--bogus=1"], "unknown option --bogus"),
    (["--batch-size", "30", "--workers", "4"], "--batch-size=30 is not divisible by workers x micro-batch"),
    (["--batch-size", "32", "--micro_batch_size", "6"], "not divisible by workers x micro-batch = 2 x 6"),
    (["--data", "nowhere.bin"], "data file nowhere.bin does not exist; create one with `halfbyte prepare-data`"),
    (["--data", "."], "data file . is a directory; pass the token file"),
    (["--seq_len", "256"], "exceeds the model context 128"),
    (["--tokenizer", "nope.json"], "neither 'builtin', 'gpt2' nor an existing tokenizer.json"),
    (["--workers", "3", "--gpus_per_node", "2"], "gpus_per_node=2 does not divide the 3 ranks"),
    (["--model", "tiny", "--d_model", "100", "--n_head", "3"], "must be divisible by model.n_head"),
    (["--engine", "ddp"], "unknown engine 'ddp'; use --engine halfbyte | fsdp2"),
    (["--engine", "fsdp2", "--virtual-ranks", "2"], "--engine fsdp2 runs real ranks (local workers or torchrun)"),
    (["--engine", "fsdp2", "--outer", "average"], "--engine fsdp2 does not run local updates"),
    # local-update options without an outer optimizer: each trained plain data parallel, silently
    (["--islands", "3"], "[outer]: outer.islands applies only to local updates, which are off "
                         "(outer.optimizer none): add --outer average | nesterov | sign-momentum, or drop it"),
    (["--outer-lr", "0.5", "--local-steps", "32", "--outer-bits", "4"],
     "[outer]: outer.local_steps, outer.lr, outer.spec apply only to local updates"),
    # 2 bits are for the outer exchange only (error feedback, every tau steps): every-step hops refuse them
    (["--comm.grad_spec.bits", "2"], "[comm]: CommConfig.grad_spec.bits must be 4 or 8, got 2: 2-bit values are "
                                     "only for the outer exchange of local updates"),
    (["--preset", "qwd", "--comm.weight_spec.bits", "2"], "[comm]: CommConfig.weight_spec.bits must be 4 or 8"),
])
def test_bad_train_input(args, message, no_workers, capsys, tmp_path):
    _fails(["train", "--out", str(tmp_path / "run"), *args], message, capsys)


def test_bad_data_and_resume(no_workers, capsys, tmp_path, token_file):
    (tmp_path / "notes.txt").write_text("plain text, not tokens " * 10)
    _fails(["train", "--data", str(tmp_path / "notes.txt")], "is not a halfbyte token file", capsys)
    _fails(["train", "--out", str(tmp_path / "run"), "--resume"], "--resume latest: no complete checkpoint in", capsys)
    _fails(["train", "--resume", str(tmp_path)], "is missing or incomplete (no COMPLETE marker)", capsys)
    # a run directory where a checkpoint belongs: it said "never finished" of a run that has checkpoints
    (tmp_path / "run" / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_000002" / "COMPLETE").write_text("ok\n")
    _fails(["train", "--resume", str(tmp_path / "run")], f"--resume {tmp_path / 'run'} is a run directory, not a "
           f"checkpoint: continue it with --out {tmp_path / 'run'} --resume auto, or name its checkpoint, e.g. "
           f"--resume {tmp_path / 'run' / 'checkpoints' / 'step_000002'}", capsys)
    _fails(["train", "--data", str(token_file), "--seq_len", "128", "--workers", "64", "--batch-size", "64"],
           "too few for 64 workers", capsys)
    _fails(["train", "--data", str(token_file), "--tokenizer", "builtin",
            "--data.val_path", str(tmp_path / "val.bin")], "val.bin does not exist", capsys)
    if importlib.util.find_spec("transformers") is None:
        _fails(["train", "--model", f"hf:{tmp_path}"], "needs the transformers package", capsys)
    else:  # with the .[hf] extra installed: the directory is what is wrong
        _fails(["train", "--model", f"hf:{tmp_path}"], "no config.json there", capsys)


def test_help_exits_zero(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--train.steps" in out and "(default: 500)" in out
    assert "--engine                       = --train.engine" in out
    assert "fsdp2: PyTorch FSDP2, fully_shard per transformer block" in out and "(default: 'halfbyte')" in out
