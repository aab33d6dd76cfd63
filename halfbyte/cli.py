"""`halfbyte` command: dispatches to the subcommand's own parser (each package owns its options)."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("halfbyte.train.cli", "train_main", "train a GPT with 4-bit sharded data parallelism"),
    "prepare-data": ("halfbyte.train.prepare_cli", "prepare_data_main", "tokenize text into a memory-mapped token file"),
    "export": ("halfbyte.train.export_cli", "export_main", "a run's weights as safetensors / HF / torch files"),
    "bench": ("halfbyte.bench.cli", "bench_main", "benchmarks: kernels | comm | train"),
    "simulate": ("halfbyte.bench.simulate", "main", "cost model: projected step time and speedup per mode"),
}


def _usage() -> str:
    lines = ["usage: halfbyte <command> [options]   (halfbyte <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"halfbyte: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
