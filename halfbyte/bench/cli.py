"""`halfbyte bench {kernels,comm,train}`: each benchmark owns its options."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("halfbyte.bench.kernels", "fused codec kernels: GB/s vs a device-to-device copy (GPU)"),
    "comm": ("halfbyte.bench.comm", "collectives per mode: time, bus bandwidth, wire bytes (torchrun)"),
    "train": ("halfbyte.bench.train_bench", "training step profile and tokens/s per mode"),
}


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: halfbyte bench <name> [options]\n\nbenchmarks:")
        for name, (_, help_) in BENCHES.items():
            print(f"  {name:<8} {help_}")
        return 0
    if argv[0] not in BENCHES:
        print(f"halfbyte bench: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)
