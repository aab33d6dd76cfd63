"""`halfbyte bench comm`: time and bandwidth of each collective and mode on whatever ranks exist.

Runs under torchrun (NCCL on CUDA) or, without a launcher, spawns `--workers N` local gloo processes
on the CPU (also where CUDA is available: N processes must not share one GPU through NCCL).
For every size N (values of the full tensor: the reduce-scatter input, the all-gather output) and
mode it reports, from rank 0 (time = slowest rank's mean over --iters calls; the sweep runs
--repeats times and a record keeps the fastest pass, the least disturbed on a shared machine):
  algbw  = N * 2 bytes (the bf16 tensor the collective stands for) / time: the effective bandwidth
           in uncompressed bytes/s, comparable across modes;
  busbw  = algbw * (W-1)/W (nccl-tests convention for all-gather / reduce-scatter);
  wire   = bytes this rank actually sent per link class (intra/inter), and wire bytes/s.

The JSON is {"meta": {...}, "records": [...]}. A record is self-describing, so that
`halfbyte simulate --calibrate` prices it with the cost model directly: collective, mode (a label),
spec / intra_spec (QuantSpec fields, or null for the uncompressed dtype; intra_spec only for the
two-level reduce-scatter), dtype_bytes (uncompressed element bytes), nodes, gpus_per_node, numel,
seconds (fastest pass) and seconds_repeats (every pass). It goes to --out, by default
runs/bench/comm-<device type>-<backend>-<M>x<L>.json under the current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from halfbyte.bench import DEFAULT_RESULTS_DIR, out_problem
from halfbyte.comm import (
    all_gather_q,
    build_topology,
    init_process_group_from_env,
    reduce_scatter_q,
    reduce_scatter_two_level,
    spawn,
)
from halfbyte.comm.topology import Topology
from halfbyte.quant import QuantSpec

H = 32
MODES: dict[str, tuple[QuantSpec | None, QuantSpec | None]] = {  # name -> (spec, intra spec)
    "bf16": (None, None),
    "int8": (QuantSpec(8), None),
    "int4": (QuantSpec(4), None),
    "int4+H": (QuantSpec(4, hadamard=H), None),
    "two-level": (QuantSpec(4, hadamard=H), QuantSpec(8, hadamard=H)),  # int8 intra, int4+H inter
}
COLLECTIVES = ("reduce_scatter", "all_gather")


def _parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like 4096, 64K, 16M or 1G, got {s!r}")
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfbyte bench comm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [_parse_size(x) for x in s.split(",")], default=None,
                   help="comma-separated values per collective (default 1M..256M on GPU, 64K,1M on CPU)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--collectives", type=lambda s: s.split(","), default=list(COLLECTIVES),
                   help=f"comma-separated subset of {','.join(COLLECTIVES)}")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per (emulated) node; default: the launcher's LOCAL_WORLD_SIZE")
    p.add_argument("--workers", type=int, default=2, help="local gloo processes when not under torchrun")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over the whole sweep; a record keeps the fastest and lists all")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_RESULTS_DIR}/comm-<device>-<backend>-<M>x<L>.json)")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(collective: str, mode: str, x: torch.Tensor, topo: Topology) -> None:
    spec, intra = MODES[mode]
    if collective == "all_gather":
        shard = x[: x.numel() // topo.world_size]
        all_gather_q(shard, spec, topo)
    elif intra is not None:
        reduce_scatter_two_level(x, intra, spec, topo, out_dtype=torch.float32, seed=0)
    else:
        reduce_scatter_q(x, spec, topo, out_dtype=torch.float32, seed=0)


def _time(collective: str, mode: str, numel: int, topo: Topology, iters: int, warmup: int) -> tuple[float, dict]:
    """(seconds per call on the slowest rank, bytes this rank sent per call and link class)."""
    x = torch.randn(numel, device=topo.device).to(torch.bfloat16)
    for _ in range(warmup):
        _run_once(collective, mode, x, topo)
    _sync(topo.device)
    dist.barrier()
    topo.stats.reset()
    start = time.perf_counter()
    for _ in range(iters):
        _run_once(collective, mode, x, topo)
    _sync(topo.device)
    seconds = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=topo.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
    return seconds.item(), {link: n // iters for link, n in topo.stats.totals().items()}


def make_record(collective: str, mode: str, numel: int, nodes: int, gpus_per_node: int,
                seconds: list[float], wire: dict[str, int]) -> dict:
    """One measurement in the format `halfbyte simulate --calibrate` reads (see the module doc)."""
    spec, intra = MODES[mode]
    W = nodes * gpus_per_node
    t = min(seconds)
    algbw = numel * 2 / t
    return {
        "collective": collective, "mode": mode,
        "spec": dataclasses.asdict(spec) if spec else None,
        "intra_spec": dataclasses.asdict(intra) if intra and collective == "reduce_scatter" else None,
        "dtype_bytes": 2, "nodes": nodes, "gpus_per_node": gpus_per_node, "numel": numel,
        "seconds": t, "seconds_repeats": seconds, "spread": max(seconds) / t - 1,
        "algbw_GBps": algbw / 1e9, "busbw_GBps": algbw * (W - 1) / W / 1e9,
        "wire_intra_bytes": wire["intra"], "wire_inter_bytes": wire["inter"],
        "wire_GBps": (wire["intra"] + wire["inter"]) / t / 1e9,
        # wire bits per value sent to another rank (the (W-1)/W of the data that leaves this rank)
        "wire_bits_per_value": 8 * (wire["intra"] + wire["inter"]) * W / (numel * (W - 1)) if W > 1 else 0.0,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _bench(args: argparse.Namespace, command: str) -> None:
    init_process_group_from_env()  # torchrun: the default backend; spawned workers already have gloo
    topo = build_topology(args.gpus_per_node)
    on_gpu = topo.device.type == "cuda"
    sizes = args.sizes or ([2**20 * k for k in (1, 4, 16, 64, 256)] if on_gpu else [2**16, 2**20])
    iters = args.iters or (20 if on_gpu else 5)
    cases = [(collective, mode, numel) for collective in args.collectives for mode in args.modes
             # two levels exist for the reduce-scatter, across >= 2 nodes
             if mode != "two-level" or (collective == "reduce_scatter" and topo.nodes >= 2)
             for numel in sizes]
    seconds: dict[tuple, list[float]] = {case: [] for case in cases}
    wire: dict[tuple, dict[str, int]] = {}
    for _ in range(args.repeats):  # whole passes, so a burst of load elsewhere hits one pass only
        for case in cases:
            t, wire[case] = _time(*case, topo, iters, args.warmup)
            seconds[case].append(t)
    if topo.rank != 0:
        return
    records = [make_record(*case, topo.nodes, topo.gpus_per_node, seconds[case], wire[case]) for case in cases]
    _print_table(records, topo)
    device = torch.cuda.get_device_name(topo.device) if on_gpu else _cpu_name()
    layout = f"{topo.device.type}-{topo.backend}-{topo.nodes}x{topo.gpus_per_node}"
    out = args.out or DEFAULT_RESULTS_DIR / f"comm-{layout}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command, "backend": topo.backend, "device": device, "world_size": topo.world_size,
        "topology": {"nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node},
        # what the ranks of one host share: on CPU the codec runs on these cores
        "host_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__, "iters": iters, "warmup": args.warmup, "repeats": args.repeats,
        "input_dtype": "bfloat16",
    }
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {out}")


def _print_table(rows: list[dict], topo: Topology) -> None:
    print(f"halfbyte bench comm: {topo.describe()}, world {topo.world_size}")
    head = f"{'collective':<15}{'mode':<11}{'values':>11}{'ms':>10}{'spread':>8}{'algbw GB/s':>12}" \
           f"{'busbw GB/s':>12}{'intra MB':>10}{'inter MB':>10}{'bits/val':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['collective']:<15}{r['mode']:<11}{r['numel']:>11}{r['seconds'] * 1e3:>10.3f}"
              f"{r['spread']:>8.1%}{r['algbw_GBps']:>12.3f}{r['busbw_GBps']:>12.3f}"
              f"{r['wire_intra_bytes'] / 1e6:>10.3f}{r['wire_inter_bytes'] / 1e6:>10.3f}"
              f"{r['wire_bits_per_value']:>9.3f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name, allowed in (("modes", MODES), ("collectives", COLLECTIVES)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            print(f"halfbyte bench comm: unknown --{name} {bad}; choose from {', '.join(allowed)}", file=sys.stderr)
            return 2
    for name, least in (("repeats", 1), ("workers", 1), ("iters", 1), ("warmup", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            print(f"halfbyte bench comm: --{name} must be >= {least}, got {getattr(args, name)}", file=sys.stderr)
            return 2
    problems = [out_problem(args.out)]
    if args.sizes and min(args.sizes) < 1:
        problems.append(f"--sizes must be >= 1 value each, got {min(args.sizes)}")
    # local workers: checked here, not in every worker (under torchrun the ranks check it)
    if "RANK" not in os.environ and args.gpus_per_node is not None and (
            args.gpus_per_node < 1 or args.workers % args.gpus_per_node):
        problems.append(f"--gpus-per-node {args.gpus_per_node} must divide --workers {args.workers}")
    if problems := [p for p in problems if p]:
        print(f"halfbyte bench comm: {'; '.join(problems)}", file=sys.stderr)
        return 2
    command = "halfbyte bench comm " + " ".join(argv if argv is not None else sys.argv[1:])
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun's arguments are not visible here: name the launcher
        command = f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']} -m {command}"
    if "RANK" in os.environ:
        _bench(args, command)
    else:
        # CPU workers, whatever the host has: left to the default backend, each would pick NCCL and
        # cuda:<rank> where CUDA is available, which on a one-GPU host does not exist past rank 0
        spawn(_bench, args.workers, args, command, backend="gloo", timeout_s=3600)
    return 0
