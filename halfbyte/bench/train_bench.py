"""`halfbyte bench train`: training step profile and tokens/s per engine and communication mode.

Every (model, engine, preset) trains the same GPT on the same batch (random tokens) in one run, driven
as `halfbyte train` drives it. --engine halfbyte: halfbyte's ShardedDataParallel (forward + backward
per micro-batch, no_sync for all but the last, `engine.step()`, `engine.zero_grad()`). --engine
fsdp2: PyTorch FSDP2, fully_shard per block + root (halfbyte.train.fsdp2.shard: bf16 weights / fp32
reduction on GPU, fp32 on CPU), torch AdamW, the trainer's update (norm, clip, step); the preset
`plain` is FSDP2 alone (no halfbyte: FSDP2's own collectives, bf16 on GPU), every other preset goes
through quantize_comms. After --warmup steps it measures --steps steps and reports, per rank and
step, averaged over ranks:

  step       wall time of one step; tokens/s = global tokens per step / step time
  forward    model forward + loss (includes waiting for weight all-gathers in the prefetch hooks)
  backward   loss.backward() (includes encoding and launching the gradient reduce-scatters; FSDP2:
             the backward re-gathers and, at its end, the wait for the last reduce-scatter)
  optimizer  engine.step(): wait for the reduce-scatters, grad norm, AdamW, launch the all-gathers
             (FSDP2: grad norm, clip, AdamW on the shards)
  zero_grad  engine.zero_grad() (it waits for the weight all-gathers still in flight)
  codec      time inside the collectives' codec steps (halfbyte.comm.timing.CODEC_STEPS: encode_chunks,
             encode_two_level, middle_hop, decode_sum, encode_shard, decode_gathered, ...):
             quantize/dequantize and the wire layout, nothing else. Overlaps the phases above (it
             happens inside them). codec_calls_per_step counts the codec steps run per step.
  comm wait  exposed communication: time inside CommHandle.wait() minus the codec run inside it
             (decoding, the two-level middle hop). Also inside the phases above. halfbyte engine
             rows only: FSDP2 runs its collectives on its own streams and its own ones are not
             timed at all, so fsdp2 rows leave it out (null) and have the overlap efficiency.
  overlap    overlap_efficiency = step / max(compute-only step, wire time), where
               compute-only step = forward + backward + (optimizer + zero_grad) / W of the same
                 engine, model and micro-batches on a world of ONE rank (halfbyte: preset
                 baseline; fsdp2: plain), measured in the same job on every rank at once; the
                 optimizer part is divided by the world size W because a rank of W updates 1/W
                 of the parameters (halfbyte simulate --compute-from reads a one-GPU run alike)
               wire time = bytes this rank sends per step (both link classes) / link rate, the
                 rate given (--link-gbps) or measured: bytes each rank sends in a bf16
                 all_gather_into_tensor of --probe-mb MB per rank over the world, per second
                 (median of 5). One rate for every byte: right on one host and for one rank per
                 node; with several GPUs per real node, the intra-node bytes are charged too.
             1.0 means the slower of compute and link is fully hidden behind the other; the
             excess over 1.0 is the step time neither hides. A world of one has no wire: null.
Timing method. The collectives report each codec step and each wait through halfbyte.comm.timing
(explicit regions in the steps themselves, so every caller's calls are seen); the Recorder is the
timer installed for the run. On CUDA every interval is a pair of CUDA events on the current stream,
read after the measured steps: the time the stream spent between them, which for a wait includes
stalling on the NCCL stream. On CPU it is perf_counter (gloo waits block the thread). A second run
with an identity codec was rejected: it changes the bytes on the wire, hence the communication it is
meant to hold fixed.

For fsdp2 rows on CUDA, codec intervals are timed on the stream FSDP2 calls the collectives on (its
all-gather / reduce-scatter streams), which overlap compute: codec ms is the codec kernels' time
there, and its cost to the step is read against the plain row. On one rank FSDP2 calls no
collective at all, so an fsdp2 row on a world of one measures nothing of the codec: its codec
share is null and the row's note says so.

Launch: under torchrun (NCCL on GPUs), `--workers N` local gloo processes on CPU, or (default) one
process as a world of one rank. Two-level gradient presets need >= 2 nodes; on one node they run
their inter-node codec as a one-level reduce-scatter instead, and the row says so.
Wire bytes per step are rank 0's CommStats (fsdp2 plain: halfbyte.train.fsdp2.bytes_per_step, the
same formulas); `bf16` is what bf16 all-gathers and reduce-scatters of the same buckets (fsdp2: the
same FSDP parameter groups, re-gathers included) would send (halfbyte.comm.accounting). Peak memory
and the qWD replica's bytes (replica_bytes: halfbyte's replica is always there, FSDP2's only under
qWD) compare what each mode keeps. The JSON goes to --out, by default
runs/bench/bench-train-<device>.json under the current directory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from halfbyte.bench import DEFAULT_RESULTS_DIR, out_problem
from halfbyte.comm import build_topology, init_process_group_from_env, spawn, timing
from halfbyte.comm.accounting import CommStats, all_gather_bytes, reduce_scatter_bytes
from halfbyte.comm.launch import default_backend, free_port
from halfbyte.comm.topology import Topology, topology_from_mesh
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.quant import backend_for
from halfbyte.train import fsdp2
from halfbyte.train.model import PRESETS as MODEL_PRESETS
from halfbyte.train.model import build_model

BF16_BYTES = 2
FP32_BYTES = 4
ENGINES = ("halfbyte", "fsdp2")
PLAIN = "plain"  # fsdp2 without halfbyte
PROBE_CALLS = 5
# environment variables that choose the transport (NCCL_P2P_DISABLE=1 ...: TCP sockets), kept in the JSON
TRANSPORT_ENV = ("NCCL_", "TORCH_SYMM_MEM_", "NVSHMEM_")
# torch 2.13 renames all_gather_into_tensor (and warns); 2.11 has only the old name
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
PHASES = ("forward", "backward", "optimizer", "zero_grad")
CODEC_STEPS = timing.CODEC_STEPS
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# Vocabulary per model when not given: the built-in tokenizer for tiny, GPT-2 padded to 64 otherwise.
DEFAULT_VOCAB = {"tiny": 4096}
GPT2_VOCAB = 50304


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfbyte bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", "--engines", type=_csv, default=["halfbyte"], dest="engines",
                   help=f"comma-separated engines ({', '.join(ENGINES)}); their rows come side by side")
    p.add_argument("--presets", type=_csv, default=[PLAIN, "baseline", "zeropp", "sdp4bit"],
                   help=f"comma-separated CommConfig presets ({', '.join(CommConfig.preset_names())}), and "
                        f"{PLAIN}: FSDP2 alone, no halfbyte (fsdp2 rows only; the halfbyte engine skips it)")
    p.add_argument("--models", "--model", type=_csv, default=None,
                   help=f"comma-separated GPT presets ({', '.join(MODEL_PRESETS)}); default 125m on GPU, tiny on CPU")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default 8 GPU, 4 CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 3 GPU, 1 CPU)")
    p.add_argument("--dtype", default="auto", help="replica dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"vocabulary (default {DEFAULT_VOCAB['tiny']} for tiny, {GPT2_VOCAB} otherwise)")
    p.add_argument("--bucket-numel", type=int, default=25_000_000, help="values per flat bucket")
    p.add_argument("--workers", type=int, default=1,
                   help="local gloo CPU processes when not under torchrun (1: this process, world of one)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per (emulated) node; default: the launcher's LOCAL_WORLD_SIZE")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="link rate for the overlap efficiency's wire time, Gb/s (default: measured)")
    p.add_argument("--probe-mb", type=float, default=None,
                   help="MB per rank of the bf16 all-gather that measures the link (default 64 GPU, 4 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_RESULTS_DIR}/bench-train-<device>.json)")
    return p


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    engines: list[str]
    presets: list[str]
    models: list[str]
    micro_batch: int
    seq_len: int | None
    grad_accum: int
    steps: int
    warmup: int
    dtype: str
    vocab_size: int | None
    bucket_numel: int
    gpus_per_node: int | None
    link_gbps: float | None
    probe_mb: float
    seed: int
    out: Path | None
    command: str

    def rows(self, model: str) -> list[tuple[str, str]]:
        """(engine, preset) of every row of `model`, in order (plain is FSDP2's only)."""
        return [(e, p) for e in self.engines for p in self.presets if not (p == PLAIN and e != "fsdp2")]

    def seq_len_for(self, model: str) -> int:
        return self.seq_len or MODEL_PRESETS[model][3]

    def vocab_for(self, model: str) -> int:
        return self.vocab_size or DEFAULT_VOCAB.get(model, GPT2_VOCAB)


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def resolve(args: argparse.Namespace, command: str, on_gpu: bool) -> BenchConfig:
    """Fill the device-dependent defaults and validate; ValueError names the bad option."""
    models = args.models or (["125m"] if on_gpu else ["tiny"])
    for name, values, allowed in (("engine", args.engines, ENGINES),
                                  ("presets", args.presets, (PLAIN, *CommConfig.preset_names())),
                                  ("models", models, tuple(MODEL_PRESETS))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"--{name} {bad or values}: choose from {', '.join(allowed)}")
    if args.presets == [PLAIN] and "fsdp2" not in args.engines:
        raise ValueError(f"--presets {PLAIN} is FSDP2 without halfbyte: add --engine fsdp2, or name a preset")
    if args.link_gbps is not None and not 0 < args.link_gbps < float("inf"):
        raise ValueError(f"--link-gbps must be a positive number, got {args.link_gbps}")
    if args.probe_mb is not None and not 0 < args.probe_mb < float("inf"):
        raise ValueError(f"--probe-mb must be a positive number, got {args.probe_mb}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    for name in ("micro_batch", "seq_len", "grad_accum", "steps", "bucket_numel", "workers", "gpus_per_node"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    _check_positive("warmup", args.warmup, 0)
    _check_positive("vocab-size", args.vocab_size, 2)
    for m in models:
        ctx = MODEL_PRESETS[m][3]
        if args.seq_len is not None and args.seq_len > ctx:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the context of model {m} ({ctx})")
    if problem := out_problem(args.out):
        raise ValueError(problem)
    if "RANK" in os.environ and args.workers != 1:
        raise ValueError("--workers is for local runs; under torchrun the launcher's ranks are used")
    if "RANK" not in os.environ and args.gpus_per_node is not None and args.workers % args.gpus_per_node:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} must divide --workers {args.workers}")
    return BenchConfig(
        engines=args.engines, presets=args.presets, models=models, micro_batch=args.micro_batch or (8 if on_gpu else 4),
        seq_len=args.seq_len, grad_accum=args.grad_accum, steps=args.steps or (10 if on_gpu else 3),
        warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1), dtype=args.dtype,
        vocab_size=args.vocab_size, bucket_numel=args.bucket_numel, gpus_per_node=args.gpus_per_node,
        link_gbps=args.link_gbps, probe_mb=args.probe_mb or (64.0 if on_gpu else 4.0),
        seed=args.seed, out=args.out, command=command)


# ---- timing ------------------------------------------------------------------------------------
class Recorder:
    """Intervals of the measured steps: phases, codec steps, waits on communication handles.

    The timer (halfbyte.comm.timing.Timer) installed for the run. Marks are CUDA events (read once
    after the measured steps) or perf_counter values. Nested regions of one kind count once, in the
    outermost (encode_chunks packs its messages with pack_messages; a gloo wait runs the next hop's
    wait); a codec step inside a wait counts as codec, not as exposed communication.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.active = False
        self.phase = ""
        self.intervals: list[tuple[str, str, str, Any, Any]] = []  # (kind, name, phase, start, end)
        self.calls: collections.Counter[str] = collections.Counter()  # outermost codec steps run
        self._depth = {"codec": 0, "wait": 0}

    def reset(self) -> None:
        """Forget what was recorded (before the measured steps)."""
        self.intervals.clear()
        self.calls.clear()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def add(self, kind: str, name: str, start: Any, end: Any) -> None:
        if self.active:
            self.intervals.append((kind, name, self.phase, start, end))

    # ---- timing.Timer -------------------------------------------------------------------------
    def begin(self, kind: timing.Kind, name: str) -> tuple[str, str, Any] | None:
        if not self.active:
            return None
        outermost = self._depth[kind] == 0
        self._depth[kind] += 1
        return kind, name, self.mark() if outermost else None

    def end(self, token: tuple[str, str, Any] | None) -> None:
        if token is None:
            return
        kind, name, start = token
        self._depth[kind] -= 1
        if start is None or not self.active:
            return
        if kind == "codec":
            self.calls[name] += 1
            self.add("codec_in_wait" if self._depth["wait"] else "codec", name, start, self.mark())
        else:
            self.add("wait", self.phase, start, self.mark())

    def totals(self) -> dict[str, float]:
        """Seconds per phase; 'codec' and per codec step ('codec:<step>'); 'exposed' (waits minus
        the codec inside them) in all and per phase ('exposed:<phase>')."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for kind, name, phase, start, end in self.intervals:
            s = self.seconds(start, end)
            keys = {"phase": [(name, 1)], "wait": [("exposed", 1), (f"exposed:{phase}", 1)],
                    "codec": [("codec", 1), (f"codec:{name}", 1)],
                    "codec_in_wait": [("codec", 1), (f"codec:{name}", 1), ("exposed", -1),
                                      (f"exposed:{phase}", -1)]}[kind]
            for key, sign in keys:
                out[key] = out.get(key, 0.0) + sign * s
        return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---- one (model, engine, preset) -------------------------------------------------------------
def comm_for(preset: str, topo: Topology) -> tuple[CommConfig, str | None]:
    """The preset on this topology (CommConfig.for_nodes: the single-node rule), and its note."""
    comm, note = CommConfig.preset(preset).for_nodes(topo.nodes)
    return comm, None if note is None else f"{preset}: {note}"


def bf16_bytes(engine: ShardedDataParallel, topo: Topology) -> dict[str, int]:
    """Bytes this rank would send per step with bf16 all-gathers and reduce-scatters."""
    M, L = topo.nodes, topo.gpus_per_node
    total = {"intra": 0, "inter": 0}
    for b in engine.buckets:
        for sent in (all_gather_bytes(b.shard_numel, BF16_BYTES, M, L),
                     reduce_scatter_bytes(b.padded_numel, BF16_BYTES, M, L)):
            for link, n in sent.items():
                total[link] += n
    return total


def _compute_dtype(cfg: BenchConfig, device: torch.device) -> torch.dtype:
    return DTYPES[cfg.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


@dataclasses.dataclass
class Worlds:
    """What the rows run over: the world's topology (halfbyte's engine) and 1-D mesh (FSDP2), and
    the same for a world of this rank alone (the compute-only steps; None on a world of one)."""

    topo: Topology
    mesh: DeviceMesh
    alone: tuple[Topology, DeviceMesh] | None

    @staticmethod
    def build(gpus_per_node: int | None) -> Worlds:
        """Collective: every rank creates the same process groups in the same order."""
        topo = build_topology(gpus_per_node)
        mesh = init_device_mesh(topo.device.type, (topo.world_size,))
        if topo.world_size == 1:
            return Worlds(topo, mesh, None)
        single = init_device_mesh(topo.device.type, (topo.world_size, 1), mesh_dim_names=("ranks", "alone"))
        return Worlds(topo, mesh, (topology_from_mesh(single["alone"], 1), single["alone"]))


class _Subject:
    """One (engine, preset) being measured: how its micro-batches accumulate, its update, its
    zero_grad, and the row fields only it knows."""

    model: nn.Module
    comm: CommConfig | None  # None: FSDP2 alone

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def stats(self) -> CommStats | None:
        """The byte counters of halfbyte's collectives (None: none run)."""
        raise NotImplementedError

    def fields(self, topo: Topology) -> dict[str, Any]:
        """bf16_bytes_per_step, replica_bytes and what else only this engine knows."""
        raise NotImplementedError


class _EngineSubject(_Subject):
    def __init__(self, cfg: BenchConfig, model: nn.Module, comm: CommConfig, topo: Topology) -> None:
        self.model, self.comm, self._topo = model, comm, topo
        self.engine = ShardedDataParallel(model, topo, optim=AdamWConfig(), comm=comm,
                                          bucket_numel=cfg.bucket_numel, seed=cfg.seed)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.engine.no_sync()

    def update(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def stats(self) -> CommStats:
        return self._topo.stats

    def fields(self, topo: Topology) -> dict[str, Any]:
        memory = self.engine.memory_report()
        return {"bf16_bytes_per_step": bf16_bytes(self.engine, topo), "replica_bytes": memory["replica"],
                "buckets": [{"padded_numel": b.padded_numel, "shard_numel": b.shard_numel}
                            for b in self.engine.buckets],
                "memory_report": memory}


class _FSDP2Subject(_Subject):
    def __init__(self, cfg: BenchConfig, model: nn.Module, comm: CommConfig | None, mesh: DeviceMesh,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.comm, self.dtype = model, comm, dtype
        self.handle = fsdp2.shard(model, mesh, comm, dtype=dtype, gpus_per_node=cfg.gpus_per_node, seed=cfg.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optim = fsdp2.make_optimizer(self.params, AdamWConfig(), device)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def update(self) -> None:
        fsdp2.update(self.params, self.optim, grad_clip=1.0)  # the engine's default clip, as its rows

    def zero_grad(self) -> None:
        self.optim.zero_grad(set_to_none=True)

    def stats(self) -> CommStats | None:
        return None if self.handle is None else self.handle.stats

    def fields(self, topo: Topology) -> dict[str, Any]:
        out = {"bf16_bytes_per_step": fsdp2.bytes_per_step(self.model, topo, BF16_BYTES, BF16_BYTES),
               "replica_bytes": 0 if self.handle is None else self.handle.replica_nbytes()}
        if self.handle is None:  # FSDP2's own collectives: what the formulas say they send
            elem = self.dtype.itemsize
            out["wire_bytes_per_step"] = fsdp2.bytes_per_step(self.model, topo, elem, FP32_BYTES if elem < 4 else elem)
        return out


def bench_one(cfg: BenchConfig, engine: str, model_name: str, preset: str, topo: Topology, mesh: DeviceMesh,
              rec: Recorder) -> dict:
    """Warm up, measure, and return this (model, engine, preset)'s row (the same on every rank of
    `topo`, the world the row runs over)."""
    device, dtype = topo.device, _compute_dtype(cfg, topo.device)
    comm, note = (None, None) if preset == PLAIN else comm_for(preset, topo)
    notes = [note] if note else []
    if engine == "fsdp2" and topo.world_size == 1:
        notes.append("fsdp2 on a world of 1: FSDP2 calls no collective, so its rows measure nothing of the codec")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)  # same initial weights for every row
    vocab, seq = cfg.vocab_for(model_name), cfg.seq_len_for(model_name)
    with torch.device(device):
        model = build_model(model_name, vocab)
    subject: _Subject = (_EngineSubject(cfg, model.to(dtype), comm, topo) if engine == "halfbyte"
                         else _FSDP2Subject(cfg, model, comm, mesh, dtype, device))  # FSDP2: fp32 masters
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * topo.rank)
    batches = [torch.randint(vocab, (cfg.micro_batch, seq + 1), generator=gen, device=device)
               for _ in range(cfg.grad_accum)]
    peak_rss = 0

    def phase_end(name: str, start: Any) -> Any:
        nonlocal peak_rss
        end = rec.mark()
        rec.add("phase", name, start, end)
        if device.type != "cuda" and rec.active:
            peak_rss = max(peak_rss, _rss_bytes())
        return end

    def train_step() -> tuple[Any, Any]:  # marks at its start and end
        mark = first = rec.mark()
        for micro, tokens in enumerate(batches):
            with subject.accumulate(last=micro == len(batches) - 1):
                rec.phase = "forward"
                logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / len(batches)
                mark = phase_end("forward", mark)
                rec.phase = "backward"
                loss.backward()
                mark = phase_end("backward", mark)
        rec.phase = "optimizer"
        subject.update()
        mark = phase_end("optimizer", mark)
        rec.phase = "zero_grad"
        subject.zero_grad()
        return first, phase_end("zero_grad", mark)

    for _ in range(cfg.warmup):
        train_step()
    dist.barrier(group=topo.world_group)
    stats = subject.stats()
    if stats is not None:
        stats.reset()
    rec.reset()
    rec.active = True
    try:
        start, end = train_step()
        for _ in range(cfg.steps - 1):
            _, end = train_step()
        totals = rec.totals()  # synchronizes first: CUDA events can be read only once completed
        step_s = rec.seconds(start, end) / cfg.steps
        calls = {name: n / cfg.steps for name, n in sorted(rec.calls.items())}
    finally:
        rec.active = False
        rec.reset()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss

    # Mean over ranks of every time; max of step time and peak memory.
    keys = ["step", *PHASES, "codec", "exposed", *(f"codec:{n}" for n in CODEC_STEPS),
            *(f"exposed:{p}" for p in PHASES)]
    per_step = [step_s, *(totals.get(k, 0.0) / cfg.steps for k in keys[1:])]
    mean = torch.tensor(per_step, dtype=torch.float64, device=device)
    dist.all_reduce(mean, group=topo.world_group)
    mean /= topo.world_size
    worst = torch.tensor([step_s, float(peak)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=topo.world_group)
    t = dict(zip(keys, mean.tolist()))
    step_s, peak, exposed = t["step"], int(worst[1].item()), t["exposed"]

    fields = subject.fields(topo)
    if stats is not None:
        fields["wire_bytes_per_step"] = {link: n // cfg.steps for link, n in stats.totals().items()}
        fields["wire_by_op_per_step"] = {op: {k: v // cfg.steps for k, v in d.items()}
                                         for op, d in stats.by_op().items()}
        fields["uncompressed_bytes_per_step"] = sum(d["baseline"] for d in fields["wire_by_op_per_step"].values())
    else:
        fields["uncompressed_bytes_per_step"] = sum(fields["wire_bytes_per_step"].values())
    codec_measured = not (engine == "fsdp2" and topo.world_size == 1)
    own_waits = engine == "halfbyte"  # FSDP2's waits are on its own streams, its own collectives untimed
    tokens = cfg.micro_batch * seq * cfg.grad_accum * topo.world_size
    row = {
        "model": model_name, "params": sum(p.numel() for p in model.parameters()), "engine": engine,
        "preset": preset, "comm": comm.describe() if comm is not None else "FSDP2 alone (no halfbyte)",
        "notes": notes, "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_rank": tokens / step_s / topo.world_size,
        "step_ms": step_s * 1e3, "step_ms_slowest_rank": worst[0].item() * 1e3,
        **{f"{p}_ms": t[p] * 1e3 for p in PHASES},
        "codec_ms": t["codec"] * 1e3 if codec_measured else None,
        "codec_pct": 100 * t["codec"] / step_s if codec_measured else None,
        "codec_ms_by_step": {n: t[f"codec:{n}"] * 1e3 for n in CODEC_STEPS if t[f"codec:{n}"] > 0},
        "codec_calls_per_step": calls,
        "exposed_comm_ms": exposed * 1e3 if own_waits else None,
        "exposed_comm_pct": 100 * exposed / step_s if own_waits else None,
        "exposed_comm_ms_by_phase": {p: t[f"exposed:{p}"] * 1e3 for p in PHASES} if own_waits else None,
        "peak_mem_bytes": peak,
        "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "RSS max at phase ends",
        **fields,
    }
    del subject, model, batches
    gc.collect()
    return row


# ---- overlap efficiency -------------------------------------------------------------------------
def link_rate(cfg: BenchConfig, topo: Topology) -> float:
    """Bytes per second each rank sends: --link-gbps, or the median of PROBE_CALLS bf16
    all_gather_into_tensor calls of --probe-mb MB per rank over the world (a ring all-gather sends
    (W - 1) x its input from every rank), after one unmeasured call."""
    if cfg.link_gbps is not None:
        return cfg.link_gbps * 1e9 / 8
    n = int(cfg.probe_mb * 1e6) // BF16_BYTES
    inp = torch.ones(n, dtype=torch.bfloat16, device=topo.device)
    out = torch.empty(n * topo.world_size, dtype=torch.bfloat16, device=topo.device)
    seconds = []
    for call in range(PROBE_CALLS + 1):
        dist.barrier(group=topo.world_group)
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        start = time.perf_counter()
        _all_gather_tensor(out, inp, group=topo.world_group)
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        if call:
            seconds.append(time.perf_counter() - start)
    del inp, out
    return (topo.world_size - 1) * n * BF16_BYTES / statistics.median(seconds)


def compute_only_ms(row: dict, world_size: int) -> float:
    """The compute-only step of a world-of-one row, as the module docstring defines it."""
    return row["forward_ms"] + row["backward_ms"] + (row["optimizer_ms"] + row["zero_grad_ms"]) / world_size


OVERLAP_KEYS = ("compute_only_ms", "wire_ms", "link_GBps", "link_rate", "overlap_efficiency")


def add_overlap(rows: list[dict], compute_ms: float, rate: float, rate_kind: str) -> None:
    """overlap_efficiency and its inputs into every row (of one engine and model)."""
    for row in rows:
        wire_ms = sum(row["wire_bytes_per_step"].values()) / rate * 1e3
        row |= dict(zip(OVERLAP_KEYS, (compute_ms, wire_ms, rate / 1e9, rate_kind,
                                       row["step_ms"] / max(compute_ms, wire_ms))))


# ---- the run ------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_rank(cfg: BenchConfig) -> dict:
    """Every row on this rank (process group initialized), then the compute-only step of each
    engine and model on a world of one and the link rate. Rank 0 prints and writes."""
    worlds = Worlds.build(cfg.gpus_per_node)
    topo = worlds.topo
    rec = Recorder(topo.device)
    notes: list[str] = []
    rows = []
    rate = None
    if worlds.alone is not None:
        rate = link_rate(cfg, topo)
    with timing.installed(rec):
        for model_name in cfg.models:
            for engine in cfg.engines:
                mine = [bench_one(cfg, engine, model_name, preset, topo, worlds.mesh, rec)
                        for e, preset in cfg.rows(model_name) if e == engine]
                if worlds.alone is None:  # a world of one sends nothing: no wire to hide
                    for row in mine:
                        row |= dict.fromkeys(OVERLAP_KEYS)
                elif mine:
                    alone_topo, alone_mesh = worlds.alone
                    reference = "baseline" if engine == "halfbyte" else PLAIN
                    alone = bench_one(cfg, engine, model_name, reference, alone_topo, alone_mesh, rec)
                    compute = torch.tensor([compute_only_ms(alone, topo.world_size)], dtype=torch.float64,
                                           device=topo.device)
                    dist.all_reduce(compute, group=topo.world_group)  # the mean over the ranks
                    add_overlap(mine, float(compute) / topo.world_size, rate,
                                "given" if cfg.link_gbps is not None else "measured")
                for note in (n for row in mine for n in row["notes"]):
                    if note not in notes:
                        notes.append(note)
                rows += mine
    result = {"meta": _meta(cfg, topo, notes, rate), "rows": rows}
    if topo.rank == 0:
        print_table(result)
        out = cfg.out or DEFAULT_RESULTS_DIR / f"bench-train-{device_slug(topo.device)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


def _meta(cfg: BenchConfig, topo: Topology, notes: list[str], rate: float | None) -> dict:
    return {
        "command": cfg.command, "device": _device_name(topo.device), "torch": torch.__version__,
        "backend": topo.backend, "world_size": topo.world_size,
        "topology": {"nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node},
        "quant_backend": backend_for(torch.empty(0, device=topo.device)).__name__.rsplit(".", 1)[-1],
        "engines": cfg.engines, "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum,
        "seq_len": {m: cfg.seq_len_for(m) for m in cfg.models},
        "vocab_size": {m: cfg.vocab_for(m) for m in cfg.models},
        "steps": cfg.steps, "warmup": cfg.warmup, "bucket_numel": cfg.bucket_numel,
        "transport_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(TRANSPORT_ENV)},
        "link_GBps": None if rate is None else rate / 1e9,
        "link_rate": None if rate is None else "given" if cfg.link_gbps is not None else
        f"measured: bf16 all-gather of {cfg.probe_mb:g} MB per rank, median of {PROBE_CALLS}",
        "timing": ("mean over ranks of per-step means; "
                   + ("CUDA events on the compute stream" if topo.device.type == "cuda" else "perf_counter")
                   + "; codec = time inside the collectives' codec steps; exposed comm = time in "
                     "CommHandle.wait minus the codec inside it (halfbyte engine rows)"),
        "notes": notes,
    }


def _cell(value: float | None, fmt: str, width: int, unit: str = "") -> str:
    """A table cell; n/a where the row measures nothing (null in the JSON)."""
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width - len(unit)}{fmt}}{unit}"


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"halfbyte bench train: {meta['device']}, torch {meta['torch']}, {meta['backend']}, world "
          f"{meta['world_size']} ({meta['topology']['nodes']} node(s) x {meta['topology']['gpus_per_node']}), "
          f"micro-batch {meta['micro_batch']} x accum {meta['grad_accum']}, seq {meta['seq_len']}, "
          f"{meta['steps']} steps after {meta['warmup']} warmup")
    head = (f"{'model':<6}{'engine':<9}{'preset':<9}{'tok/s':>10}{'step ms':>9}{'fwd':>8}{'bwd':>8}{'opt':>8}"
            f"{'zero':>7}{'codec ms':>9}{'codec %':>8}{'comm ms':>8}{'comm %':>7}{'peak MB':>9}"
            f"{'intra MB':>9}{'inter MB':>9}{'bf16 MB':>9}{'overlap':>8}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        wire, bf16 = r["wire_bytes_per_step"], r["bf16_bytes_per_step"]
        print(f"{r['model']:<6}{r['engine']:<9}{r['preset']:<9}{r['tokens_per_s']:>10,.0f}{r['step_ms']:>9.1f}"
              f"{r['forward_ms']:>8.1f}{r['backward_ms']:>8.1f}{r['optimizer_ms']:>8.1f}{r['zero_grad_ms']:>7.1f}"
              f"{_cell(r['codec_ms'], '.2f', 9)}{_cell(r['codec_pct'], '.1f', 8, '%')}"
              f"{_cell(r['exposed_comm_ms'], '.1f', 8)}{_cell(r['exposed_comm_pct'], '.1f', 7, '%')}"
              f"{r['peak_mem_bytes'] / 2**20:>9.0f}{wire['intra'] / 1e6:>9.2f}{wire['inter'] / 1e6:>9.2f}"
              f"{sum(bf16.values()) / 1e6:>9.2f}{_cell(r['overlap_efficiency'], '.2f', 8)}")
    for note in meta["notes"]:
        print(f"note: {note}")
    print("codec and comm are inside the fwd/bwd/opt/zero phases (step = fwd + bwd + opt + zero); "
          "wire MB per rank per step; overlap = step / max(compute-only step, wire time at "
          + (f"{meta['link_GBps']:.2f} GB/s)" if meta["link_GBps"] else "the link rate)"))


@contextlib.contextmanager
def _single_process_group() -> Iterator[None]:
    """A world of one rank in this process (nccl with CUDA, else gloo), torn down afterwards;
    an already initialized process group is used as it is."""
    if dist.is_initialized():
        yield
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        init_process_group_from_env(default_backend())
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = "halfbyte bench train " + " ".join(argv)
    launched = "RANK" in os.environ
    # Spawned workers are gloo CPU processes; under torchrun or alone the default backend decides.
    on_gpu = default_backend() == "nccl" and (launched or args.workers == 1)
    try:
        cfg = resolve(args, command, on_gpu)
    except ValueError as e:
        print(f"halfbyte bench train: {e}", file=sys.stderr)
        return 2
    if launched:
        init_process_group_from_env()
        try:
            run_rank(cfg)
        finally:
            dist.destroy_process_group()
    elif args.workers == 1:
        with _single_process_group():
            run_rank(cfg)
    else:
        spawn(run_rank, args.workers, cfg, backend="gloo", timeout_s=3600)
    return 0
