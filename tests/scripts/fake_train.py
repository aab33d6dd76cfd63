"""A fast stand-in for `halfbyte train` in the study script's tests, with the behaviour the script
relies on: `--resume auto` continues from the newest complete checkpoint in --out (or starts fresh),
SIGTERM stops at the next step boundary after saving a checkpoint, metrics.jsonl keeps one record
per step (records past the resumed step are dropped, as RunLogger does), and a fresh start into a
non-empty --out is refused. Each invocation appends {"argv", "resumed_from"} to <out>/fake_calls.jsonl.

Environment: FAKE_STEP_S (seconds per step, default 0), FAKE_SHARED (a directory: each live fake
keeps a file there, and a step takes FAKE_STEP_S x the number of live fakes, as runs sharing one GPU
do), FAKE_FAIL_PRESET (exit 1 at step 3 for that --preset)."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

MARKER = "COMPLETE"


def main(argv: list[str]) -> int:
    opts = dict(zip(argv[::2], argv[1::2]))
    out, steps = Path(opts["--out"]), int(opts["--steps"])
    every, seed, preset = int(opts["--train.eval_interval"]), int(opts["--seed"]), opts["--preset"]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    done = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if (p / MARKER).is_file())
    start = done[-1] if opts.get("--resume") == "auto" and done else 0
    metrics = out / "metrics.jsonl"
    if not start and metrics.is_file():
        if opts.get("--resume") != "auto":
            print(f"fake train: {out} is not empty", file=sys.stderr)
            return 2
        metrics.unlink()
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= start] if start else []
    metrics.write_text("".join(line + "\n" for line in kept))
    with open(out / "fake_calls.jsonl", "a") as calls:
        calls.write(json.dumps({"argv": argv, "resumed_from": start}) + "\n")
    offset = 0.01 * seed + {"qw4": 0.05}.get(preset, 0.0)
    fail = preset == os.environ.get("FAKE_FAIL_PRESET")
    shared = Path(os.environ["FAKE_SHARED"]) if os.environ.get("FAKE_SHARED") else None
    if shared is not None:
        (shared / str(os.getpid())).touch()
    try:
        return train(out, metrics, range(start + 1, steps + 1), every, offset, fail, shared, stop)
    finally:
        if shared is not None:
            (shared / str(os.getpid())).unlink()


def train(out: Path, metrics: Path, steps: range, every: int, offset: float, fail: bool, shared: Path | None,
          stop: list) -> int:
    step_s = float(os.environ.get("FAKE_STEP_S", "0"))
    with open(metrics, "a") as log:
        for step in steps:
            time.sleep(step_s * (len(os.listdir(shared)) if shared is not None else 1))
            if fail and step == 3:
                print("fake train: simulated failure", file=sys.stderr)
                return 1
            loss = 2.0 + 3.0 * math.exp(-step / 100) + offset
            record = {"step": step, "loss": round(loss + 0.1, 5), "elapsed_s": step * step_s}
            if step % every == 0 or step == steps[-1]:
                record["val_loss"] = round(loss, 5)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if stop or step == steps[-1]:
                (out / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
                (out / "checkpoints" / f"step_{step:06d}" / MARKER).write_text("ok\n")
                if stop:
                    print(f"stopped at step {step}")
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
