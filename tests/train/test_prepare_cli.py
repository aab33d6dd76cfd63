"""`halfbyte prepare-data` on real files, and on bad input: exit code 2 and one line naming the problem."""

import json

import numpy as np
import pytest

from halfbyte.cli import main
from halfbyte.train.data import open_tokens


def test_prepare_data(tmp_path, capsys):
    corpus = tmp_path / "corpus" / "sub"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("KING:\nWhat says the fool?\n" * 200)
    (corpus / "b.txt").write_text("FOOL:\nNothing, nuncle.\n" * 200)
    (corpus / "skip.md").write_text("# not matched by the glob\n" * 200)
    out = tmp_path / "data.bin"
    assert main(["prepare-data", str(tmp_path / "corpus"), "--out", str(out), "--val-fraction", "0.1"]) == 0
    train, val = open_tokens(out), open_tokens(tmp_path / "data.val.bin")
    info = json.loads((tmp_path / "data.bin.json").read_text())
    assert info["files"] == 2 and info["tokenizer"] == "builtin" and info["train_tokens"] == len(train)
    assert train.vocab_size == 4096 and train.tokens.dtype == np.uint16
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15


@pytest.mark.parametrize("args, message", [
    (["missing_dir", "--out", "x.bin"], "input missing_dir does not exist"),
    (["{tmp}", "--out", "x.bin", "--glob", "*.nothing"], "no files matching --glob '*.nothing'"),
    (["{tmp}", "--out", "x.bin", "--tokenizer", "nope"], "neither 'builtin', 'gpt2'"),
    (["{tmp}", "--out", "x.bin", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["{tmp}"], "the following arguments are required: --out"),
])
def test_bad_prepare_data_input(args, message, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    argv = ["prepare-data", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
