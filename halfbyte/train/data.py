"""Data: the built-in Shakespeare corpus, memory-mapped token files and `prepare` (text -> tokens).
Sampling windows for training and evaluation is `halfbyte.train.sampling`.

Token file = 32-byte header (magic, version, itemsize, vocab size, token count) + raw tokens (uint16 when
the vocabulary fits, else uint32), so training memory-maps it whatever its size. `prepare` writes a
training file and a validation file beside it (`x.bin` -> `x.val.bin`); the validation part is the last
`val_fraction` of every document, cut at a line break, so the split is deterministic.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from halfbyte.train.tokenizer import Tokenizer

MAGIC = b"HBTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, vocab_size, count
PLAY_SEPARATOR = "\n\n\n"  # plays in shakespeare.txt.gz are separated by two blank lines
BUILTIN_VAL_FRACTION = 0.05
ENCODE_PIECE_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces, in parallel
ENCODE_BATCH_CHARS = 1 << 25  # ~32 MB of text per encode_batch call: enough to keep every core busy


class TokenFileError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- corpus


def builtin_corpus_path() -> Path:
    return Path(str(resources.files("halfbyte.train") / "data" / "shakespeare.txt.gz"))


def read_builtin_plays() -> list[str]:
    with gzip.open(builtin_corpus_path(), "rt", encoding="utf-8") as f:
        return [p for p in f.read().split(PLAY_SEPARATOR) if p.strip()]


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last `val_fraction` of the text, starting at a line break."""
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


# ------------------------------------------------------------------------------------------ token files


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def val_path_for(path: str | Path) -> Path:
    path = Path(path)
    _not_a_directory(path)
    return path.with_name(f"{path.stem}.val{path.suffix}")


def _not_a_directory(path: Path) -> None:
    if path.is_dir():
        raise TokenFileError(f"data file {path} is a directory; pass the token file `halfbyte prepare-data` "
                             "wrote (prepare-data takes directories of text)")


@dataclass
class TokenFile:
    path: Path
    vocab_size: int
    tokens: np.ndarray  # memory-mapped, read-only

    def __len__(self) -> int:
        return len(self.tokens)


def open_tokens(path: str | Path) -> TokenFile:
    path = Path(path)
    _not_a_directory(path)
    if not path.is_file():
        raise TokenFileError(f"data file {path} does not exist; create one with `halfbyte prepare-data`")
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise TokenFileError(f"{path} is not a halfbyte token file; create one with `halfbyte prepare-data`")
    _, version, itemsize, vocab_size, count = HEADER.unpack(head)
    if version != VERSION or itemsize not in (2, 4):
        raise TokenFileError(f"{path}: unsupported token file version {version} / itemsize {itemsize}")
    if path.stat().st_size != HEADER.size + itemsize * count:
        raise TokenFileError(f"{path} is truncated (header says {count} tokens); prepare it again")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,)) if count else np.zeros(0, dtype)
    return TokenFile(path, vocab_size, tokens)


class TokenWriter:
    """Streams token arrays into a token file; the file appears (atomically) only on close()."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, vocab_size, 0))

    def write(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._file.write(arr.tobytes())
        self.count += arr.size

    def close(self) -> Path:
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.count))
        self._file.close()
        os.replace(self._tmp, self.path)  # atomic: concurrent writers of the same file cannot tear it
        return self.path

    def discard(self) -> None:
        """Drop what was written: a failed or interrupted prepare leaves no temporary file behind."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _pieces(text: str) -> list[str]:
    """Cut a long text at line breaks into ~ENCODE_PIECE_CHARS pieces so encode_batch can parallelize."""
    pieces, start = [], 0
    while len(text) - start > ENCODE_PIECE_CHARS:
        cut = text.rfind("\n", start + 1, start + ENCODE_PIECE_CHARS)
        cut = start + ENCODE_PIECE_CHARS if cut < 0 else cut + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def prepare(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    val_fraction: float,
    total_chars: int | None = None,
    progress: bool = True,
) -> tuple[TokenFile, TokenFile]:
    """Tokenize documents (each followed by EOT) into `out` and its validation file `val_path_for(out)`.

    Pieces of many documents go to the tokenizer in one `encode_batch` call of ~ENCODE_BATCH_CHARS, so
    corpora of many small files (source trees) are tokenized on every core, not one file at a time.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eot = tokenizer.eot_id
    writers: list[TokenWriter] = []
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress)
    pending: list[tuple[int, str, bool]] = []  # (writer, piece, ends its document part), in file order
    pending_chars = 0

    def flush() -> None:
        for (which, _, last), ids in zip(pending, tokenizer.encode_batch([piece for _, piece, _ in pending])):
            writers[which].write(ids)
            if last:
                writers[which].write([eot])
        bar.update(sum(len(piece) for _, piece, _ in pending))
        pending.clear()

    try:
        for path in (Path(out), val_path_for(out)):
            writers.append(TokenWriter(path, tokenizer.vocab_size))
        for doc in documents:
            for which, part in enumerate(split_document(doc, val_fraction)):
                if not part:
                    continue
                pieces = _pieces(part)
                pending.extend((which, piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))
                pending_chars += len(part)
            if pending_chars >= ENCODE_BATCH_CHARS:
                flush()
                pending_chars = 0
        flush()
        train, val = (open_tokens(w.close()) for w in writers)
    except BaseException:
        for w in writers:
            w.discard()
        raise
    finally:
        bar.close()
    return train, val


def read_text(path: Path) -> tuple[str, int]:
    """A file's text, and how many of its bytes are not UTF-8. Those become U+FFFD (one per undecodable
    sequence) and line ends read as "\n", as in text mode: the characters of a file are not its size."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if "\ufffd" not in text:  # nothing replaced (a U+FFFD in the file itself is counted as 0 below)
        return text, 0
    data = path.read_bytes()
    # surrogateescape turns each undecodable byte into one lone surrogate, which "ignore" then drops
    valid = data.decode("utf-8", errors="surrogateescape").encode("utf-8", errors="ignore")
    return text, len(data) - len(valid)


def read_text_files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield read_text(path)[0]


def cache_dir() -> Path:
    root = os.environ.get("HALFBYTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "halfbyte"
    )
    return Path(root)


def builtin_token_files(tokenizer: Tokenizer, *, progress: bool = False) -> tuple[Path, Path]:
    """The built-in corpus tokenized with `tokenizer`, cached per tokenizer (a few seconds the first time)."""
    train = cache_dir() / f"shakespeare-{tokenizer.fingerprint}.bin"
    val = val_path_for(train)
    if not (train.is_file() and val.is_file()):
        plays = read_builtin_plays()
        prepare(plays, tokenizer, train, val_fraction=BUILTIN_VAL_FRACTION,
                total_chars=sum(map(len, plays)), progress=progress)
    return train, val


# -------------------------------------------------------------------------------------------- sampling
