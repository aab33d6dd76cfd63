"""Try every user mistake docs/errors.md lists against the installed `halfbyte` and print the table:
what each gets (exit code and the last line it prints). A small run is trained first, so that the
resume and checkpoint cases have a checkpoint to damage. About a minute on 2 CPU cores.

    python scripts/bad_inputs.py > /tmp/table.md     # then paste into docs/errors.md
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=2", "--seq_len=32", "--batch-size=8",
         "--eval_tokens=256", "--sample_tokens=0", "--steps=4", "--checkpoint_interval=2", "--keep_checkpoints=2"]


def halfbyte(cwd: Path, *args: str) -> tuple[int, str]:
    """Exit code and the last line written (stderr first), progress bars left out."""
    p = subprocess.run([sys.executable, "-m", "halfbyte", *args], capture_output=True, text=True, cwd=cwd)
    for stream in (p.stderr, p.stdout):
        lines = [line for line in stream.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
        if lines:
            return p.returncode, lines[-1]
    return p.returncode, ""


def damage(ckpt: Path, how: str) -> None:
    if how == "truncated .distcp":
        data = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:100])
    elif how == "garbage meta.json":
        (ckpt / "meta.json").write_text("{nope")
    elif how == "no .metadata":
        (ckpt / ".metadata").unlink()
    elif how == "garbage .metadata":
        (ckpt / ".metadata").write_bytes(b"\x80junk")
    else:  # no COMPLETE marker
        (ckpt / "COMPLETE").unlink()


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="halfbyte-bad-inputs-"))
    small = " ".join(["(a small run:", *SMALL[:3], "...)"])
    code, line = halfbyte(work, "train", *SMALL, "--out=run")
    if code:
        sys.exit(f"the small run failed ({code}): {line}")
    (work / "afile").write_text("x")
    (work / "empty.txt").write_text("")
    cases: list[tuple[str, list[str], str]] = [  # (what, argv, how the command reads in the table)
        ("`--lr nan`", ["train", "--lr", "nan"], ""),
        ("`--lr inf`", ["train", "--lr", "inf"], ""),
        ("a fraction where an integer belongs", ["train", "--steps", "1.5"], ""),
        ("an unknown option", ["train", "--stpes", "3"], ""),
        ("an ambiguous key", ["train", "--bits", "8"], ""),
        ("a codec the quantizer does not have", ["train", "--comm.grad_spec.bits", "3"], ""),
        ("a missing --config file", ["train", "--config", "nope.toml"], ""),
        ("a new run into an occupied --out", ["train", *SMALL, "--out=run"], f"train {small} --out run"),
        ("`--out` is a file", ["train", *SMALL, "--out=afile"], f"train {small} --out afile"),
        ("`--out` cannot be created", ["train", *SMALL, "--out=afile/sub"], f"train {small} --out afile/sub"),
        ("`--data` is a directory", ["train", "--data", "."], ""),
        ("`--data` is empty", ["train", "--data", ""], "train --data ''"),
        ("a negative seed", ["train", "--seed", "-1"], ""),
        ("an unknown weight_decay_on", ["train", "--train.weight_decay_on", "norms"], ""),
        ("islands without an outer optimizer", ["train", "--islands", "2"], ""),
        ("`--resume latest` with no checkpoint", ["train", "--out=empty", "--resume", "latest"], ""),
        ("`--resume` of a path that does not exist", ["train", "--resume", "no/such/dir"], ""),
        ("`--resume` of a run directory", ["train", "--resume", "run"], ""),
        ("resume with another preset", ["train", "--out=run", "--resume", "auto", "--preset", "baseline"], ""),
        ("resume with another model size", ["train", "--out=run", "--resume", "auto", "--model.n_layer", "3"], ""),
        ("resume with more steps", ["train", "--out=run", "--resume", "auto", "--steps", "6"], ""),
        ("resume with weight decay on other parameters",
         ["train", "--out=run", "--resume", "auto", "--train.weight_decay_on", "all"], ""),
        ("resume of a finished run", ["train", "--out=run", "--resume", "auto"], ""),
        ("`--virtual-ranks` with dropout", ["train", "--virtual-ranks", "2", "--model.dropout", "0.1"], ""),
        ("`--train.device cuda` without a GPU", ["train", "--virtual-ranks", "2", "--train.device", "cuda"], ""),
    ]
    ckpt = work / "run" / "checkpoints" / "step_000004"
    for how in ("truncated .distcp", "garbage meta.json", "no .metadata", "garbage .metadata", "no COMPLETE marker"):
        copy = work / f"ckpt-{how.replace(' ', '-').replace('.', '')}"
        shutil.copytree(ckpt, copy)
        damage(copy, how)
        cases.append((f"a checkpoint with a {how}" if how.startswith(("garbage", "truncated")) else
                      f"a checkpoint with {how}", ["train", f"--resume={copy.name}"], ""))
    cases += [("export into an occupied directory", ["export", "run", "--out", "run"], ""),
              ("export of something that is no checkpoint", ["export", ".", "--out", "x"], ""),
              ("export of a path that does not exist", ["export", "no/such/run", "--out", "x"], ""),
              ("export `--out` under a file", ["export", "run", "--out", "afile/sub"], ""),
              ("prepare-data of files that hold no text", ["prepare-data", "empty.txt", "--out", "e.bin"], "")]
    print("| input | command | exit | what it prints (the last line) |")
    print("|---|---|---|---|")
    for what, argv, shown in cases:
        code, line = halfbyte(work, *argv)
        shown = shown or " ".join(argv)
        cell = line.replace(str(work) + "/", "").replace("|", "\\|")  # markdown: a | inside a cell is written \|
        print(f"| {what} | `halfbyte {shown}` | {code} | {cell} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
