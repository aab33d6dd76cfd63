"""`halfbyte prepare-data`: text files -> a memory-mapped token file for `halfbyte train --data`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from halfbyte.train.data import prepare, read_text, read_text_files, val_path_for
from halfbyte.train.paths import file_in_the_way
from halfbyte.train.tokenizer import load_tokenizer

#: Files named in the warning about undecodable bytes; the rest are counted.
NAMED_FILES = 10


def _fail(message: str) -> int:
    print(f"halfbyte prepare-data: error: {message}", file=sys.stderr)
    return 2


def sidecar_path(path: Path) -> Path:
    """The JSON beside a token file that says how it was made (tokenizer, counts)."""
    return path.with_name(path.name + ".json")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # one line, exit code 2
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _input_files(inputs: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob(pattern) if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"input {item} does not exist; pass text files or directories")
    if not files:
        raise ValueError(f"no files matching --glob {pattern!r} under {', '.join(inputs)}; change --glob")
    return files


def _output_path(arg: str) -> Path:
    """--out, checked before any work: a file name, not a directory, where this process can write."""
    out = Path(arg)
    if arg.endswith(("/", os.sep)) or out.is_dir():
        raise ValueError(f"--out {arg} is a directory; name the token file, e.g. --out {out / 'data.bin'}")
    if (blocker := file_in_the_way(out)) is not None:
        raise ValueError(f"--out {arg}: {blocker} is a file, not a directory; choose another --out")
    for path, what in ((val_path_for(out), "validation tokens"), (sidecar_path(out), "description")):
        if path.is_dir():
            raise ValueError(f"{path} is a directory, where --out {arg} would write its {what}; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise ValueError(f"cannot write --out {arg}: {e.strerror or e}") from None
    return out


def _refuse_inputs(out: Path, files: list[Path]) -> None:
    """An output that is one of the inputs would overwrite the text it is made from."""
    inputs = {p.resolve() for p in files}
    for path in (out, val_path_for(out), sidecar_path(out)):
        if path.resolve() in inputs:
            raise ValueError(f"{path} is one of the inputs, which --out {out} would overwrite; choose another --out")


def _count_characters(files: list[Path]) -> tuple[int, dict[Path, int]]:
    """(characters of all files, undecodable bytes per file that has any): a first pass, so that the
    tokenizing bar counts what it will see and the warning comes before the long part."""
    chars, undecodable = 0, {}
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="reading",
              leave=False) as bar:
        for path in files:
            text, bad = read_text(path)
            chars += len(text)
            if bad:
                undecodable[path] = bad
            bar.update(path.stat().st_size)
    return chars, undecodable


def _undecodable_warning(undecodable: dict[Path, int], nfiles: int) -> str:
    named = [f"{path} ({n:,} byte{'s' if n > 1 else ''})" for path, n in list(undecodable.items())[:NAMED_FILES]]
    if len(undecodable) > NAMED_FILES:
        named.append(f"and {len(undecodable) - NAMED_FILES} more")
    return (f"halfbyte prepare-data: warning: {len(undecodable)} of {nfiles} files are not valid UTF-8, their "
            f"undecodable bytes become U+FFFD: {', '.join(named)}")


def prepare_data_main(argv: list[str]) -> int:
    parser = OneLineParser(prog="halfbyte prepare-data", description=(
        "Tokenize text files into a memory-mapped token file for `halfbyte train --data OUT`. Writes OUT "
        "(training tokens), OUT's .val twin (the last --val-fraction of every file) and OUT.json (what made it)."))
    parser.add_argument("inputs", nargs="+", help="text files, or directories searched recursively")
    parser.add_argument("--out", required=True, help="output token file, e.g. data.bin (also writes data.val.bin)")
    parser.add_argument("--tokenizer", default="builtin",
                        help="builtin (4096-token BPE) | gpt2 (needs halfbyte[gpt2]) | path to tokenizer.json "
                             "(default: builtin)")
    parser.add_argument("--glob", default="*.txt", help="file name pattern inside directories (default: *.txt)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="tail of every file kept for validation (default: 0.01)")
    args = parser.parse_args(argv)
    try:
        if not 0.0 <= args.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        files = _input_files(args.inputs, args.glob)
        tokenizer = load_tokenizer(args.tokenizer)
        out = _output_path(args.out)
        _refuse_inputs(out, files)
        if not any(p.stat().st_size for p in files):  # a token file of 0 tokens, which train refuses only later
            raise ValueError(f"the {len(files)} input file(s) hold no text; nothing was written")
    except ValueError as e:
        return _fail(str(e))
    try:
        chars, undecodable = _count_characters(files)
    except OSError as e:
        return _fail(f"cannot read {e.filename}: {e.strerror or e}")
    if undecodable:
        print(_undecodable_warning(undecodable, len(files)), file=sys.stderr)
    try:
        train, val = prepare(read_text_files(files), tokenizer, out, val_fraction=args.val_fraction,
                             total_chars=chars)
        spec = args.tokenizer if args.tokenizer in ("builtin", "gpt2") else str(Path(args.tokenizer).resolve())
        sidecar_path(out).write_text(json.dumps({
            "tokenizer": spec, "vocab_size": tokenizer.vocab_size, "files": len(files),
            "train_tokens": len(train), "val_tokens": len(val), "val_fraction": args.val_fraction}, indent=1))
    except OSError as e:  # a full disk, a file changed under us
        return _fail(f"cannot write {e.filename or out}: {e.strerror or e}")
    print(f"{len(files)} file(s) -> {out} ({len(train):,} tokens, {train.tokens.dtype}) and "
          f"{val.path} ({len(val):,} tokens); vocab {tokenizer.vocab_size}")
    return 0
