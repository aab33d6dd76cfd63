"""Issue 18: is torch's fused AdamW faster than foreach on the engine's master shards? Times
`engine.step()` (gradient reduction, the AdamW update of every owned fp32 master shard, the weight
all-gather) for AdamWConfig(fused=False) and (fused=True) on one device, everything else equal.

    python scripts/bench_adamw.py [--models 350m,1.3b] [--steps 20] [--out FILE.json]

One process owns every shard (a VirtualWorld of one rank, preset baseline), so the update covers
the whole model: what W ranks each do on 1/W of it. Prints the median step time per setting and
writes a JSON naming the device and the command. Run it on a GPU (the CPU has no fused kernel
worth timing; it runs, for a smoke test, with --device cpu --models tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # halfbyte from this checkout

from halfbyte.comm.config import CommConfig  # noqa: E402
from halfbyte.engine import AdamWConfig, ShardedDataParallel, VirtualWorld  # noqa: E402
from halfbyte.train.model import build_model  # noqa: E402

VOCAB = 50304


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model_name: str, fused: bool, steps: int, device: torch.device) -> list[float]:
    """Seconds per engine.step() (a forward and backward before each, not timed)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's replica dtypes
    model = build_model(model_name, VOCAB).to(device, dtype)
    engine = ShardedDataParallel(model, VirtualWorld(1, device=device), AdamWConfig(fused=fused),
                                 CommConfig.preset("baseline"))
    x = torch.randint(0, VOCAB, (1, 64), device=device)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        engine.zero_grad()
        with engine.as_rank(0):
            model(x).float().logsumexp(-1).mean().backward()
        sync(device)
        t0 = time.perf_counter()
        engine.step(1e-5)
        engine.wait_weights()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="350m,1.3b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_adamw: no CUDA GPU here; use --device cpu --models tiny for a smoke test", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        medians = {}
        for fused in (False, True):
            times = time_steps(name, fused, args.steps, device)
            medians[fused] = statistics.median(times)
            rows.append({"model": name, "fused": fused, "median_step_ms": round(1e3 * medians[fused], 3),
                         "min_ms": round(1e3 * min(times), 3), "max_ms": round(1e3 * max(times), 3)})
            print(f"{name:6s} fused={fused!s:5s} engine.step {1e3 * medians[fused]:8.2f} ms "
                  f"(min {1e3 * min(times):.2f}, max {1e3 * max(times):.2f}, {len(times)} steps)", flush=True)
        print(f"{name:6s} fused / foreach = {medians[True] / medians[False]:.3f}", flush=True)
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                        "command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
