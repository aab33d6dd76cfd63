"""Step time, tokens/s, peak memory and bytes sent of FSDP2 with and without halfbyte's collectives.

Each mode trains the same GPT (halfbyte.train.model) for --warmup + --steps steps of
--batch x --seq tokens per rank, bf16 compute with fp32 master weights and fp32 gradient
reduction (FSDP2 mixed precision), AdamW on the DTensor parameters, fully_shard per block plus the
root (reshard_after_forward=True). Modes: plain (FSDP2 alone), any CommConfig preset (baseline,
sdp4bit, zeropp, qwd, qw4, tlq, tlq-hs), and qwz8 (direct int8 weights, full gradients: the ZeRO-3
memory point next to qWD's replica). Two-level gradients on one node run one level
(CommConfig.for_nodes).

At a world size of 1 FSDP2 runs no collectives, so every mode equals plain there: measure on >= 2
ranks. GPU: torchrun --nproc_per_node=2 scripts/fsdp_bench.py --model 1.3b ...; CPU smoke run:
python scripts/fsdp_bench.py --spawn 2 --model tiny --device cpu. Prints one line per mode and
writes --out (JSON naming the device and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from halfbyte.comm import init_process_group_from_env, spawn
from halfbyte.comm.config import CommConfig
from halfbyte.fsdp import shard_model
from halfbyte.quant import QuantSpec
from halfbyte.train.model import build_model

MODES = ("plain", "qwz8", *CommConfig.preset_names())


def comm_for(mode: str) -> CommConfig:
    if mode == "qwz8":
        return CommConfig(weights="direct", weight_spec=QuantSpec(bits=8, group_size=2048))
    return CommConfig.preset(mode)


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One mode: build, shard, warm up, time; numbers of this rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(args.model, args.vocab)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (world,))
    handle, note = None, None
    if mode == "plain":
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    else:
        nodes = world // (args.gpus_per_node or world)
        comm, note = comm_for(mode).for_nodes(nodes)
        handle = shard_model(model, mesh, comm, gpus_per_node=args.gpus_per_node, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(rank)
    tokens = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=g, device=device)

    def step() -> float:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # a host sync: each step is timed to its end

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sent_before = handle.stats.summary() if handle else None
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    elapsed = time.perf_counter() - start
    result = {
        "mode": mode, "comm": handle.comm.describe() if handle else "FSDP2 alone", "note": note,
        "step_s": elapsed / args.steps, "tokens_per_s": args.batch * args.seq * world * args.steps / elapsed,
        "final_loss": losses[-1],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "replica_bytes": handle.replica_nbytes() if handle else 0,
    }
    if handle:
        after = handle.stats.summary()
        result["sent_MB_per_step"] = (after["sent_MB"] - sent_before["sent_MB"]) / args.steps
        result["uncompressed_MB_per_step"] = (after["baseline_MB"] - sent_before["baseline_MB"]) / args.steps
    return result


def worker(args: argparse.Namespace) -> list[dict]:
    init_process_group_from_env(args.backend)
    device = torch.device(args.device) if args.device else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    results = []
    for mode in args.modes:
        results.append(run_mode(mode, args, device))
        if device.type == "cuda":  # the previous mode's model and optimizer are gone: start clean
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="GPT preset: tiny, 125m, 350m, 1.3b")
    parser.add_argument("--modes", default="plain,baseline,sdp4bit,qwd,qwz8",
                        help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="ranks per (emulated) node; default LOCAL_WORLD_SIZE")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA)")
    parser.add_argument("--spawn", type=int, default=0, help="start this many local ranks (CPU runs)")
    parser.add_argument("--out", default="fsdp_bench.json")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.spawn:
        results = spawn(worker, args.spawn, args, timeout_s=3600, backend=None)[0]
        world = args.spawn
    else:
        results = worker(args)
        world = dist.get_world_size()
        if dist.get_rank() != 0:
            dist.destroy_process_group()
            return
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    report = {"device": device, "world_size": world, "torch": torch.__version__,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    if world == 1:
        report["warning"] = "world size 1: FSDP2 runs no collectives, every mode equals plain"
    for r in results:
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "n/a"
        print(f"{r['mode']:>9}: {r['step_s'] * 1e3:8.1f} ms/step {r['tokens_per_s']:10.0f} tok/s "
              f"peak {mem} replica {r['replica_bytes'] / 2**20:.1f} MiB "
              f"sent {r.get('sent_MB_per_step', float('nan')):.2f} MB/step")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
