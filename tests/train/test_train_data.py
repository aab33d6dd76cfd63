import numpy as np
import pytest

from halfbyte.train.data import (
    HEADER,
    TokenFileError,
    TokenWriter,
    open_tokens,
    prepare,
    read_builtin_plays,
    split_document,
    val_path_for,
)
from halfbyte.train.sampling import TokenSampler, eval_batches
from halfbyte.train.tokenizer import load_tokenizer


def _token_file(path, n, vocab=1000):
    w = TokenWriter(path, vocab)
    w.write(np.arange(n) % vocab)
    return open_tokens(w.close())


def test_token_file_header_dtype_and_errors(tmp_path):
    small = _token_file(tmp_path / "a.bin", 100)
    assert small.tokens.dtype == np.uint16 and len(small) == 100 and small.vocab_size == 1000
    assert (tmp_path / "a.bin").stat().st_size == HEADER.size + 200
    big = _token_file(tmp_path / "b.bin", 10, vocab=70_000)
    assert big.tokens.dtype == np.uint32 and list(big.tokens) == list(range(10))
    with pytest.raises(TokenFileError, match="does not exist"):
        open_tokens(tmp_path / "missing.bin")
    (tmp_path / "text.bin").write_text("just some text, long enough to fill a header......")
    with pytest.raises(TokenFileError, match="not a halfbyte token file"):
        open_tokens(tmp_path / "text.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-2])
    with pytest.raises(TokenFileError, match="truncated"):
        open_tokens(tmp_path / "cut.bin")


def test_builtin_corpus_and_split():
    plays = read_builtin_plays()
    assert len(plays) == 38 and 4_000_000 < sum(map(len, plays)) < 6_000_000
    assert plays[0].startswith("THESEUS:\n")  # A Midsummer Night's Dream, speaker lines kept
    train, val = split_document(plays[0], 0.05)
    assert train + val == plays[0] and train.endswith("\n")
    assert 0.04 < len(val) / len(plays[0]) < 0.06


def test_prepare_writes_train_and_val(tmp_path):
    tok = load_tokenizer("builtin")
    docs = [f"LINE {i}: to be or not to be\n" * 40 for i in range(3)]
    train, val = prepare(docs, tok, tmp_path / "d.bin", val_fraction=0.1, progress=False)
    assert val.path == val_path_for(tmp_path / "d.bin") == tmp_path / "d.val.bin"
    assert train.tokens.tolist().count(tok.eot_id) == 3 == val.tokens.tolist().count(tok.eot_id)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    text = tok.decode(train.tokens.tolist()) + tok.decode(val.tokens.tolist())
    assert text.replace("<|endoftext|>", "").count("to be or not to be") == 120


def test_prepare_batches_across_documents_without_changing_tokens(tmp_path, monkeypatch):
    """Batching pieces of many documents per encode_batch call must give the tokens of encoding each
    document part on its own, EOT after each part, whatever the batch and piece sizes."""
    import halfbyte.train.data as data

    tok = load_tokenizer("builtin")
    docs = [f"def f{i}(x):\n    return x * {i}\n" * (1 + 7 * i) for i in range(9)]
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 200)  # several flushes
    monkeypatch.setattr(data, "ENCODE_PIECE_CHARS", 64)  # long documents cut into several pieces
    train, val = prepare(docs, tok, tmp_path / "d.bin", val_fraction=0.2, progress=False)
    expect_train, expect_val = [], []
    for doc in docs:
        for out, part in zip((expect_train, expect_val), split_document(doc, 0.2)):
            out.extend(tok.encode(part) + [tok.eot_id] if part else [])
    assert train.tokens.tolist() == expect_train and val.tokens.tolist() == expect_val


def test_sampler_ranks_are_disjoint_deterministic_and_resumable(tmp_path):
    data = _token_file(tmp_path / "a.bin", 10_001, vocab=20_000)  # token value == position
    seq = 10
    starts = {}
    for rank in range(3):
        s = TokenSampler(data, seq, rank, 3, seed=1)
        x, y = s.next_batch(333)  # one whole epoch: 1000 windows // 3 ranks
        assert torch_equal(x[:, 1:], y[:, :-1]) and (x[:, 0] % seq == 0).all()
        starts[rank] = set(x[:, 0].tolist())
    assert all(len(v) == 333 for v in starts.values())
    assert not (starts[0] & starts[1]) and not (starts[0] & starts[2]) and not (starts[1] & starts[2])

    a = TokenSampler(data, seq, 1, 3, seed=1)
    b = TokenSampler(data, seq, 1, 3, seed=1)
    assert torch_equal(a.next_batch(5)[0], b.next_batch(5)[0])  # deterministic from the seed
    assert not torch_equal(a.next_batch(5)[0], TokenSampler(data, seq, 1, 3, seed=2).next_batch(10)[0][5:])
    a.next_batch(400)  # crosses into epoch 1
    state = a.state_dict()
    assert state["epoch"] == 1
    resumed = TokenSampler(data, seq, 1, 3, seed=1)
    resumed.load_state_dict(state)
    assert torch_equal(a.next_batch(7)[0], resumed.next_batch(7)[0])


def test_eval_batches_are_disjoint_across_ranks(tmp_path):
    data = _token_file(tmp_path / "v.bin", 1001, vocab=20_000)
    firsts = [set(x[:, 0].tolist()) for r in range(2) for x, _ in eval_batches(data, 10, r, 2, 4, 24)]
    rank0 = set().union(*firsts[:3])
    rank1 = set().union(*firsts[3:])
    assert len(rank0) == len(rank1) == 12 and not rank0 & rank1


def test_eval_set_is_fixed_whatever_the_world_and_spans_the_whole_split(tmp_path):
    """The same windows for every world size and micro-batch (a fixed evaluation set), spread evenly
    over the whole file rather than its first windows."""
    data = _token_file(tmp_path / "v.bin", 10_001, vocab=20_000)

    def window_starts(world: int, micro: int) -> list[int]:
        return sorted(int(x[i, 0]) for r in range(world) for x, _ in eval_batches(data, 10, r, world, micro, 40)
                      for i in range(x.shape[0]))

    one = window_starts(1, 8)
    assert len(one) == 40 and one == window_starts(4, 3) == window_starts(8, 5)
    assert max(one) >= 9_000  # tokens are their own positions here: the last window lies near the end
    assert len(set(one)) == 40


def test_sampler_rejects_too_little_data(tmp_path):
    data = _token_file(tmp_path / "a.bin", 15)
    with pytest.raises(TokenFileError, match="too few for 2 ranks"):
        TokenSampler(data, 10, 0, 2, seed=0)


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_sampler_resumes_on_another_world_size_with_the_next_windows(tmp_path):
    """Two ranks draw 3 steps of 4 windows each; resumed on 4 ranks, the next global batch is the
    one the 2 ranks would have drawn next (the same windows, dealt to more ranks)."""
    data = _token_file(tmp_path / "a.bin", 10_001, vocab=20_000)
    seq = 10
    two = [TokenSampler(data, seq, r, 2, seed=3) for r in range(2)]
    for _ in range(3):
        for s in two:
            s.next_batch(4)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["consumed"] == 24
    want = {int(v) for s in two for v in s.next_batch(4)[0][:, 0]}
    four = [TokenSampler(data, seq, r, 4, seed=3) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    got = {int(v) for s in four for v in s.next_batch(2)[0][:, 0]}
    assert got == want and len(got) == 8
