"""`halfbyte prepare-data` on real files, and on bad input: exit code 2 and one line naming the problem."""

import errno
import json
import re

import numpy as np
import pytest

from halfbyte.cli import main
from halfbyte.train.data import open_tokens
from halfbyte.train.tokenizer import load_tokenizer


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
    (["{tmp}", "--out", "{tmp}/"], "is a directory; name the token file, e.g."),
    (["{tmp}", "--out", "{tmp}/new/"], "is a directory; name the token file, e.g."),
    (["{tmp}", "--out", "{tmp}/taken.bin"], "taken.val.bin is a directory"),
    (["{tmp}", "--out", "{tmp}/a.txt/x.bin"], "a.txt is a file, not a directory"),  # was "File exists"
    (["{tmp}/empty.txt", "--out", "{tmp}/x.bin"], "hold no text"),  # was a 0-token file, exit 0
])
def test_bad_prepare_data_input(args, message, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "taken.val.bin").mkdir()  # where the validation twin of taken.bin would go
    (tmp_path / "empty.txt").write_text("")
    argv = ["prepare-data", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.bin").exists()


def test_an_out_that_is_one_of_the_inputs_is_refused_and_left_as_it_was(tmp_path, capsys):
    """`--out corpus/a.txt` used to overwrite the input a.txt with tokens (and write a.val.txt)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello\n" * 50)
    for out, name in ((corpus / "a.txt", "a.txt"), (corpus / "b.txt", "b.val.txt")):
        (corpus / "b.val.txt").write_text("world\n" * 50)  # the validation twin of --out b.txt
        assert main(["prepare-data", str(corpus), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name} is one of the inputs" in err, err
    assert (corpus / "a.txt").read_text() == "hello\n" * 50 and (corpus / "b.val.txt").read_text() == "world\n" * 50
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt", "b.val.txt"]


def test_undecodable_bytes_are_replaced_with_a_warning_naming_each_file(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("h\u00e9llo w\u00f6rld \ufffd\n" * 50)  # U+FFFD written on purpose is fine
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 10)  # 2 bad bytes a line
    (corpus / "one.txt").write_bytes(b"ok\n" * 50 + b"\xff" + b"end\n")
    assert main(["prepare-data", str(corpus), "--out", str(tmp_path / "d.bin")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "2 of 3 files" in warnings[0] and "U+FFFD" in warnings[0]
    assert "latin1.txt (20 bytes)" in warnings[0] and "one.txt (1 byte)" in warnings[0]
    assert "good.txt" not in warnings[0]
    text = load_tokenizer("builtin").decode(open_tokens(tmp_path / "d.bin").tokens.tolist())
    assert "caf\ufffd cr\ufffdme" in text  # replaced as before


def test_progress_bar_ends_at_100_percent(tmp_path, capsys, monkeypatch):
    """Sizes on disk are not characters: CRLF line ends read as one, multi-byte and undecodable sequences
    as one character each."""
    import halfbyte.train.data as data

    finals = []

    class Bar(data.tqdm):
        def close(self):
            if not self.disable:  # closed already otherwise (tqdm closes again when collected)
                finals.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(data, "tqdm", Bar)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "crlf.txt").write_bytes(b"To be, or not to be: that is the question.\r\n" * 2000)
    (corpus / "utf8.txt").write_text("\u2014 \u00e9t\u00e9 \u201cquoted\u201d\n" * 2000)
    (corpus / "bad.txt").write_bytes(b"\xe2\x80 \xff\xfe\n" * 2000)
    assert main(["prepare-data", str(corpus), "--out", str(tmp_path / "d.bin")]) == 0
    (done, total), = finals
    assert done == total > 0
    bars = [s for s in re.split(r"[\r\n]", capsys.readouterr().err) if s.startswith("tokenizing:")]
    assert "100%" in bars[-1], bars[-1]


def test_a_failed_write_is_one_line_and_leaves_no_temporary_files(tmp_path, capsys, monkeypatch):
    import halfbyte.train.data as data

    def disk_full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(data.TokenWriter, "write", disk_full)
    (tmp_path / "a.txt").write_text("hello\n" * 100)
    assert main(["prepare-data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out" / "d.bin")]) == 2
    err = capsys.readouterr().err  # after the progress bars
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err
    assert list((tmp_path / "out").iterdir()) == []
