"""The training loop every rank runs: model + engine, data, schedule, evaluation, checkpoints, and (on
rank 0) progress, metrics, the loss plot, a text sample and the final summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from halfbyte.comm import all_gather_bytes, build_topology, reduce_scatter_bytes
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel, checkpoint
from halfbyte.engine.local import LocalUpdates, build_islands
from halfbyte.engine.sharded import StepResult
from halfbyte.engine.virtual import VirtualDataParallel
from halfbyte.train.config import Config, OptimConfig
from halfbyte.train.data import open_tokens
from halfbyte.train.sampling import TokenSampler, eval_batches
from halfbyte.train.metrics import RunLogger, fmt_bytes, fmt_time, plot_loss
from halfbyte.train.model import build_model, generate
from halfbyte.train.tokenizer import load_tokenizer
from halfbyte.engine.virtual_islands import VirtualLocalUpdates

BF16_BYTES = 2
SAMPLE_PROMPT = "ROMEO:\n"  # for the built-in corpus; other data starts the sample at a document break


@dataclass
class RunPlan:
    """Everything the workers need, resolved and checked in the launching process (picklable)."""

    cfg: Config
    train_path: str
    val_path: str | None
    vocab_size: int  # of the data; the GPT's embedding is rounded up to a multiple of 64
    tokenizer: str | None  # for the text sample; None: no sample
    builtin_data: bool
    resume_path: str | None
    world_size: int
    gpus_per_node: int | None  # None: the launcher's LOCAL_WORLD_SIZE
    micro_batch: int
    accum: int
    local_workers: bool  # started by `halfbyte train` itself (not torchrun)
    virtual: bool = False  # world_size virtual ranks in this one process
    islands: int = 0  # local updates across this many islands (0: off)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to optim.lr, then cosine decay to optim.min_lr at total_steps (step is 0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


class StopRequest:
    """SIGINT / SIGTERM only set a flag; the loop stops at the next step boundary, on every rank at once,
    and saves a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    root = out_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "COMPLETE").exists()) if root.is_dir() else []


def bf16_bytes_per_step(buckets: list, nodes: int, gpus_per_node: int) -> int:
    """Bytes all ranks together would send per step with bf16 all-gather + bf16 reduce-scatter, every
    step across the whole world (also the reference for local updates)."""
    world, per_rank = nodes * gpus_per_node, 0
    for b in buckets:
        n = b.replica.numel()
        for sent in (all_gather_bytes(-(-n // world), BF16_BYTES, nodes, gpus_per_node),
                     reduce_scatter_bytes(n, BF16_BYTES, nodes, gpus_per_node)):
            per_rank += sum(sent.values())
    return per_rank * world


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _build_model(plan: RunPlan, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    m = plan.cfg.model
    torch.manual_seed(plan.cfg.train.seed)  # same initialization everywhere (the engine broadcasts rank 0's anyway)
    model = build_model(m.name, -(-plan.vocab_size // 64) * 64, n_layer=m.n_layer, n_head=m.n_head,
                        d_model=m.d_model, ctx=m.ctx, rope=m.rope, dropout=m.dropout)
    return model.to(device=device, dtype=dtype)


def _engine_options(plan: RunPlan, island: int = 0) -> dict[str, Any]:
    """Engine settings; each island gets its own rounding seed, so that rank l of every island does not
    draw the same stochastic-rounding noise (correlated errors would not average out across islands)."""
    o, t = plan.cfg.optim, plan.cfg.train
    return dict(optim=AdamWConfig(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay),
                comm=CommConfig.preset(t.preset), bucket_numel=t.bucket_numel, grad_clip=o.grad_clip or None,
                seed=t.seed + 7919 * island)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


@torch.no_grad()
def _eval_sums(model: torch.nn.Module, batches: list, device: torch.device) -> torch.Tensor:
    """[loss sum, token count] of one rank's validation batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        logits = model(x.to(device))
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total[1] += y.numel()
    model.train()
    return total


def _save_marker(path: Path) -> None:
    (path / checkpoint.MARKER).write_text("ok\n")


class _Ranks:
    """What both drivers share: outer-step count and bytes on the wire. A subclass sets engine,
    local (or None), _stats_per_process (how many ranks' bytes one process's stats stand for) and
    calls _reset_wire() once its engine exists."""

    engine: Any
    local: Any
    _stats_per_process = 1

    @property
    def outer_steps(self) -> int:
        return self.local.outer_steps if self.local else 0

    def _sent(self) -> torch.Tensor:
        now = self.engine.stats.totals()
        island = sum(self.local.stats.totals().values()) if self.local else 0
        return torch.tensor([now["intra"], now["inter"], island], dtype=torch.float64) * self._stats_per_process

    def _reset_wire(self) -> None:
        self._stats_start = self._sent()

    def wire(self) -> torch.Tensor:
        """[intra, inter, inter-island] bytes this process's ranks sent since it started."""
        return self._sent() - self._stats_start


class ProcessRank(_Ranks):
    """This process is one real rank (the process group is initialized): the engine on the whole
    world, or on this rank's island with LocalUpdates across islands."""

    def __init__(self, plan: RunPlan) -> None:
        t = plan.cfg.train
        if plan.local_workers and "OMP_NUM_THREADS" not in os.environ:
            # local workers share the CPUs this process may use (taskset / cgroup aware): no oversubscription
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cpus // plan.world_size))
        self.plan, self.rank, self.world_size = plan, dist.get_rank(), plan.world_size
        self.rank0 = self.rank == 0
        if plan.islands:
            self.islands = build_islands(plan.islands, plan.gpus_per_node)
            topo = self.islands.island
            self.describe = f"{self.islands.describe()}; {plan.cfg.outer.engine_config().describe()}"
        else:
            self.islands, topo = None, build_topology(plan.gpus_per_node)
            self.describe = topo.describe()
        self.topo, self.device = topo, topo.device
        self.dtype = _compute_dtype(t.dtype, self.device)
        self.model = _build_model(plan, self.device, self.dtype)
        self.engine = ShardedDataParallel(
            self.model, topo, **_engine_options(plan, self.islands.index if self.islands else 0))
        torch.manual_seed(t.seed + 1 + self.rank)  # after the shared init: each rank its own dropout masks
        self.local = (LocalUpdates(self.engine, self.islands, plan.cfg.outer.engine_config(), seed=t.seed)
                      if self.islands else None)
        per_node = plan.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", plan.world_size))
        self.bf16_step = bf16_bytes_per_step(self.engine.buckets, plan.world_size // per_node, per_node)
        self.train_data = open_tokens(plan.train_path)
        self.sampler = TokenSampler(self.train_data, t.seq_len, self.rank, plan.world_size, t.seed)
        self.val_batches = (eval_batches(open_tokens(plan.val_path), t.seq_len, self.rank, plan.world_size,
                                         plan.micro_batch, t.eval_tokens // t.seq_len) if plan.val_path else [])
        self._reset_wire()

    def train_step(self, lr: float) -> tuple[torch.Tensor, StepResult]:
        """Forward/backward of this rank's micro-batches, the engine step (and the outer step)."""
        plan, step_loss = self.plan, torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(plan.accum):
            x, y = self.sampler.next_batch(plan.micro_batch)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with contextlib.nullcontext() if micro == plan.accum - 1 else self.engine.no_sync():
                loss = _loss(self.model, x, y) / plan.accum
                loss.backward()
            step_loss += loss.detach()
        result = self.engine.step(lr=lr)
        if self.local is not None:
            self.local.step(lr)
        self.engine.zero_grad()
        return step_loss, result

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def check_replicas(self) -> None:
        self.engine.check_replicas()

    def evaluate(self) -> float:
        total = self.all_sum(_eval_sums(self.model, self.val_batches, self.device))
        return float(total[0] / total[1])

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        extra = {**extra, "data": self.sampler.state_dict()}
        if self.local is None:
            self.engine.save_checkpoint(path, extra)
            return
        if self.rank0:
            (path / checkpoint.MARKER).unlink(missing_ok=True)
        dist.barrier()
        self.local.save_checkpoint(path, extra)  # path/island<i>/
        dist.barrier()
        if self.rank0:
            _save_marker(path)

    def load(self, path: str) -> dict[str, Any]:
        extra = self.local.load_checkpoint(path) if self.local else self.engine.load_checkpoint(path)
        self.sampler.load_state_dict(extra["data"])
        self._reset_wire()
        return extra


class VirtualRanks(_Ranks):
    """This process emulates all W ranks: each virtual rank samples the data real rank w would, and
    the engine (VirtualDataParallel) runs their communication math. With local updates: one
    engine and model copy per island, VirtualLocalUpdates across them."""

    def __init__(self, plan: RunPlan) -> None:
        t = plan.cfg.train
        self.plan, self.world_size, self.rank0 = plan, plan.world_size, True
        self._stats_per_process = plan.world_size  # every real rank sends what the stats count for one
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _compute_dtype(t.dtype, self.device)
        K = plan.islands or 1
        self.island_size = plan.world_size // K
        L = min(plan.gpus_per_node, self.island_size)  # an island lies inside one node or holds whole nodes
        self.models = [_build_model(plan, self.device, self.dtype) for _ in range(K)]
        self.engines = [VirtualDataParallel(model, self.island_size, L, **_engine_options(plan, k))
                        for k, model in enumerate(self.models)]
        self.model, self.engine = self.models[0], self.engines[0]
        self.local = (VirtualLocalUpdates(self.engines, plan.cfg.outer.engine_config(), seed=t.seed)
                      if plan.islands else None)
        topo = self.engine.topo
        self.describe = (f"{K} island(s) of {topo.describe()}; {plan.cfg.outer.engine_config().describe()}"
                         if plan.islands else topo.describe())
        self.bf16_step = bf16_bytes_per_step(self.engine.buckets, plan.world_size // plan.gpus_per_node,
                                             plan.gpus_per_node)
        self.train_data = open_tokens(plan.train_path)
        self.samplers = [TokenSampler(self.train_data, t.seq_len, w, plan.world_size, t.seed)
                         for w in range(plan.world_size)]
        val = open_tokens(plan.val_path) if plan.val_path else None
        self.val_batches = ([eval_batches(val, t.seq_len, w, plan.world_size, plan.micro_batch, t.eval_tokens // t.seq_len)
                             for w in range(plan.world_size)] if val is not None else [])
        self._reset_wire()

    def train_step(self, lr: float) -> tuple[torch.Tensor, StepResult]:
        plan, step_loss = self.plan, torch.zeros((), dtype=torch.float64, device=self.device)
        for w, sampler in enumerate(self.samplers):
            island, local_rank = divmod(w, self.island_size)
            model, engine = self.models[island], self.engines[island]
            with engine.virtual_rank(local_rank):
                for _ in range(plan.accum):
                    x, y = sampler.next_batch(plan.micro_batch)
                    loss = _loss(model, x.to(self.device), y.to(self.device)) / plan.accum
                    loss.backward()
                    step_loss += loss.detach()
        results = [engine.step(lr=lr) for engine in self.engines]
        if self.local is not None:
            self.local.step(lr)
        for engine in self.engines:
            engine.zero_grad()
        return step_loss.cpu(), results[0]  # island 0's, as real rank 0 reports its own island's

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.cpu()  # this process holds every rank's share already

    def check_replicas(self) -> None:
        """Nothing to compare: one replica per island stands for all its ranks by construction."""

    def evaluate(self) -> float:
        total = sum(_eval_sums(self.models[w // self.island_size], batches, self.device)
                    for w, batches in enumerate(self.val_batches))
        return float(total[0] / total[1])

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        extra = {**extra, "data": [s.state_dict() for s in self.samplers]}
        (self.local or self.engine).save_checkpoint(path, extra)

    def load(self, path: str) -> dict[str, Any]:
        extra = (self.local or self.engine).load_checkpoint(path)
        for sampler, state in zip(self.samplers, extra["data"]):
            sampler.load_state_dict(state)
        self._reset_wire()
        return extra


def run_worker(plan: RunPlan) -> dict[str, Any]:
    """Train on this rank (the process group is initialized). Returns rank 0's summary."""
    stop = StopRequest()  # first: a Ctrl-C during start-up also ends in a clean stop after one step
    return _train(plan, ProcessRank(plan), stop)


def run_virtual(plan: RunPlan) -> dict[str, Any]:
    """Train plan.world_size virtual ranks in this process. Returns the summary."""
    stop = StopRequest()
    return _train(plan, VirtualRanks(plan), stop)


def _train(plan: RunPlan, ranks: ProcessRank | VirtualRanks, stop: StopRequest) -> dict[str, Any]:
    cfg, t, o = plan.cfg, plan.cfg.train, plan.cfg.optim
    out_dir, rank0, device = cfg.out_dir, ranks.rank0, ranks.device
    if rank0 and not plan.resume_path:
        _fresh_out_dir(cfg)

    step, elapsed, wire_offset = 0, 0.0, torch.zeros(3, dtype=torch.float64)
    if plan.resume_path:
        extra = ranks.load(plan.resume_path)
        step, elapsed = int(extra["step"]), float(extra["elapsed_s"])
        saved_wire = list(extra["wire_bytes"]) + [0.0] * (3 - len(extra["wire_bytes"]))  # before inter-island
        wire_offset = torch.tensor(saved_wire, dtype=torch.float64)
    start_step = step
    tokens_per_step = t.batch_size * t.seq_len

    log = None
    if rank0:
        print(_banner(plan, ranks, start_step), flush=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        log = RunLogger(out_dir, t.steps, start_step, resumed=bool(plan.resume_path))

    def save(step: int, wire: torch.Tensor) -> Path:
        path = out_dir / "checkpoints" / f"step_{step:06d}"
        ranks.save(path, {"step": step, "elapsed_s": elapsed, "wire_bytes": wire.tolist()})
        if rank0:
            for old in checkpoint_dirs(out_dir)[: -t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    loss_sum, loss_steps, window_time, window_start = 0.0, 0, 0.0, step
    val_loss, train_loss, checkpoint_path = float("nan"), float("nan"), None
    wire = wire_offset.clone()
    stopped = False
    while step < t.steps and not stopped:
        t0 = time.perf_counter()
        lr = lr_at(step, o, t.steps)
        step_loss, result = ranks.train_step(lr)
        step += 1
        # One small all-reduce per step: mean loss, whether any rank was asked to stop, bytes on the wire.
        shared = ranks.all_sum(torch.cat([step_loss.reshape(1).cpu(),
                                          torch.tensor([float(stop.requested)], dtype=torch.float64),
                                          ranks.wire()]))
        train_loss = float(shared[0]) / ranks.world_size
        stopped = bool(shared[1] > 0)
        wire = wire_offset + shared[2:]
        dt = time.perf_counter() - t0
        elapsed += dt
        loss_sum, loss_steps, window_time = loss_sum + train_loss, loss_steps + 1, window_time + dt

        final = step == t.steps
        evaluated = bool(ranks.val_batches) and not stopped and (
            final or (t.eval_interval and step % t.eval_interval == 0))
        if evaluated:
            val_loss = ranks.evaluate()
        bf16_total = ranks.bf16_step * step
        if log is not None:
            tok_s = (step - window_start) * tokens_per_step / max(window_time, 1e-9)
            log.progress(step, f"loss {train_loss:.3f} | {tok_s:,.0f} tok/s | wire {fmt_bytes(wire.sum())} "
                               f"(bf16 {fmt_bytes(bf16_total)})")
            if final or stopped or evaluated or step == 1 or step % t.log_interval == 0:
                record = {"step": step, "loss": round(loss_sum / loss_steps, 5), "lr": lr,
                          "tokens_per_s": round(tok_s, 1), "grad_norm": round(result.grad_norm, 5),
                          "wire_intra_bytes": int(wire[0]), "wire_inter_bytes": int(wire[1]),
                          "wire_bf16_bytes": bf16_total, "skipped_steps": ranks.engine.skipped_steps,
                          "elapsed_s": round(elapsed, 2)}
                if plan.islands:
                    record |= {"outer_steps": ranks.outer_steps, "wire_island_bytes": int(wire[2])}
                if evaluated:
                    record["val_loss"] = round(val_loss, 5)
                log.log(record)
                loss_sum, loss_steps, window_time, window_start = 0.0, 0, 0.0, step
        if t.check_replicas_interval and step % t.check_replicas_interval == 0:
            ranks.check_replicas()  # raises, naming the bucket, if a replica diverged
        if final or stopped or (t.checkpoint_interval and step % t.checkpoint_interval == 0):
            checkpoint_path = save(step, wire)

    summary = {"step": step, "stopped": stopped, "loss": train_loss, "val_loss": val_loss,
               "wire_bytes": wire.tolist(), "wire_bf16_bytes": ranks.bf16_step * step, "elapsed_s": elapsed,
               "skipped_steps": ranks.engine.skipped_steps, "outer_steps": ranks.outer_steps,
               "checkpoint": str(checkpoint_path) if checkpoint_path else None,
               "dtype": str(ranks.dtype).removeprefix("torch.")}
    if log is not None:
        log.close()
        _finish(plan, ranks.model, summary, out_dir, device)
    return summary


def _fresh_out_dir(cfg: Config) -> None:
    """A new run (no --resume) replaces the previous run's outputs in the same directory."""
    out_dir = cfg.out_dir
    if (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists():
        print(f"note: {out_dir} holds an earlier run; replacing it (use --resume to continue it instead)")
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "sample.txt"):
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _banner(plan: RunPlan, ranks: ProcessRank | VirtualRanks, start_step: int) -> str:
    cfg, t, engine = plan.cfg, plan.cfg.train, ranks.engine
    if plan.virtual:
        val_tokens = sum(y.numel() for batches in ranks.val_batches for _, y in batches)
    else:
        val_tokens = sum(y.numel() for _, y in ranks.val_batches) * plan.world_size
    val = f"{val_tokens:,} validation tokens" if ranks.val_batches else "no validation data"
    model = ranks.model
    lines = [
        f"model {cfg.model.name}: {model.num_params() / 1e6:.2f}M parameters, "
        f"{str(next(model.parameters()).dtype).removeprefix('torch.')}",
        f"ranks: {plan.world_size} ({ranks.describe})",
        f"preset {t.preset}: {engine.comm.describe()}",
        f"data: {plan.train_path} ({len(ranks.train_data):,} tokens), {val}",
        f"batch: {t.batch_size} x {t.seq_len} tokens = {t.batch_size * t.seq_len:,} tokens/step "
        f"({plan.micro_batch} per rank per pass, {plan.accum} accumulation step(s)); {t.steps} steps",
        f"output: {plan.cfg.out_dir}",
    ]
    if plan.islands and t.steps % cfg.outer.local_steps:
        lines.append(f"note: {t.steps} steps is not a multiple of --local-steps {cfg.outer.local_steps}: the "
                     "islands end apart (evaluation averages their models; the sample uses island 0's)")
    if start_step:
        lines.append(f"resuming from {plan.resume_path} at step {start_step}")
    return "\n".join(lines)


def _finish(plan: RunPlan, model: torch.nn.Module, summary: dict[str, Any], out_dir: Path,
            device: torch.device) -> None:
    """Rank 0: plot, text sample, summary lines."""
    t = plan.cfg.train
    ranks = f"{plan.world_size} {'virtual ' if plan.virtual else ''}ranks"
    notice = plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png",
                       f"{plan.cfg.model.name}, preset {t.preset}, {ranks}")
    lines = [notice] if notice else []
    if summary["stopped"]:
        lines.append(f"stopped at step {summary['step']}; checkpoint saved: {summary['checkpoint']}")
        lines.append("continue with: halfbyte train ... --resume (same options)")
    elif plan.tokenizer and t.sample_tokens:
        sample = _sample(plan, model, device)
        (out_dir / "sample.txt").write_text(sample)
        lines.append(f"--- sample ({t.sample_tokens} tokens) ---\n{sample.strip()}\n---")
    intra, inter, island = summary["wire_bytes"]
    sent, bf16 = intra + inter + island, summary["wire_bf16_bytes"]
    who = (f"all ranks, emulated: {plan.world_size} x what one real rank would send" if plan.virtual
           else "all ranks")
    lines += [
        f"done: step {summary['step']}/{t.steps} in {fmt_time(summary['elapsed_s'])} | train loss "
        f"{summary['loss']:.3f} | val loss {summary['val_loss']:.3f} | skipped steps {summary['skipped_steps']}",
    ]
    if plan.islands:
        u = plan.cfg.outer
        lines.append(f"local updates: {summary['outer_steps']} outer steps ({u.optimizer}, every {u.local_steps} "
                     f"steps, {plan.islands} islands); inter-island {fmt_bytes(island)} "
                     f"({island / max(summary['step'] * t.batch_size * t.seq_len, 1):.3g} B/token), "
                     f"inside islands {fmt_bytes(intra + inter)}")
    lines += [
        f"wire ({who}): {fmt_bytes(sent)} sent (inter-node {fmt_bytes(inter + island)}, intra-node {fmt_bytes(intra)}) "
        + (f"vs {fmt_bytes(bf16)} with bf16 communication (nothing was sent)" if sent == 0 else
           f"vs {fmt_bytes(bf16)} with bf16 communication: {bf16 / sent:.1f}x less, {fmt_bytes(bf16 - sent)} saved"
           if sent < bf16 else
           f"= {sent / max(bf16, 1):.1f}x what bf16 communication would send: preset {t.preset} sends "
           f"{summary['dtype']} values uncompressed"),
        f"outputs: {out_dir}/ (metrics.jsonl, loss.png, checkpoints/)",
    ]
    print("\n".join(lines), flush=True)


def _sample(plan: RunPlan, model: torch.nn.Module, device: torch.device) -> str:
    tokenizer = load_tokenizer(plan.tokenizer)
    prompt = tokenizer.encode(SAMPLE_PROMPT) if plan.builtin_data else [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(plan.cfg.train.seed)
    ids = generate(model, torch.tensor([prompt], device=device), plan.cfg.train.sample_tokens, generator=generator)
    return tokenizer.decode([i for i in ids[0].tolist() if i < tokenizer.vocab_size])
