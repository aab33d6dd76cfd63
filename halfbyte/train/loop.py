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
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.train.config import Config, OptimConfig
from halfbyte.train.data import TokenSampler, eval_batches, open_tokens
from halfbyte.train.metrics import RunLogger, fmt_bytes, fmt_time, plot_loss
from halfbyte.train.model import build_model, generate
from halfbyte.train.tokenizer import load_tokenizer

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


def bf16_bytes_per_step(engine: ShardedDataParallel) -> int:
    """Bytes all ranks together would send per step with bf16 all-gather + bf16 reduce-scatter."""
    topo = engine.topo
    per_rank = 0
    for b in engine.buckets:
        for sent in (all_gather_bytes(b.shard_numel, BF16_BYTES, topo.nodes, topo.gpus_per_node),
                     reduce_scatter_bytes(b.replica.numel(), BF16_BYTES, topo.nodes, topo.gpus_per_node)):
            per_rank += sum(sent.values())
    return per_rank * topo.world_size


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, device: torch.device, group: Any) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for x, y in batches:
        logits = model(x.to(device))
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total[1] += y.numel()
    dist.all_reduce(total, group=group)
    model.train()
    return float(total[0] / total[1])


def run_worker(plan: RunPlan) -> dict[str, Any]:
    """Train on this rank (the process group is initialized). Returns rank 0's summary."""
    cfg, t = plan.cfg, plan.cfg.train
    out_dir = cfg.out_dir
    stop = StopRequest()  # first: a Ctrl-C during start-up also ends in a clean stop after one step
    if plan.local_workers and "OMP_NUM_THREADS" not in os.environ:
        # local workers share the CPUs this process may use (taskset / cgroup aware): no oversubscription
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // plan.world_size))
    topo = build_topology(plan.gpus_per_node)
    rank0 = topo.rank == 0
    device, dtype = topo.device, _compute_dtype(t.dtype, topo.device)
    if rank0 and not plan.resume_path:
        _fresh_out_dir(cfg)

    torch.manual_seed(t.seed)  # same initialization everywhere (the engine broadcasts rank 0's anyway)
    m = cfg.model
    model = build_model(m.name, -(-plan.vocab_size // 64) * 64, n_layer=m.n_layer, n_head=m.n_head,
                        d_model=m.d_model, ctx=m.ctx, rope=m.rope, dropout=m.dropout)
    model.to(device=device, dtype=dtype)
    o = cfg.optim
    engine = ShardedDataParallel(
        model, topo,
        optim=AdamWConfig(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay),
        comm=CommConfig.preset(t.preset), bucket_numel=t.bucket_numel,
        grad_clip=o.grad_clip or None, seed=t.seed,
    )

    train_data = open_tokens(plan.train_path)
    sampler = TokenSampler(train_data, t.seq_len, topo.rank, topo.world_size, t.seed)
    val_batches = (eval_batches(open_tokens(plan.val_path), t.seq_len, topo.rank, topo.world_size,
                                plan.micro_batch, t.eval_iters) if plan.val_path else [])

    step, elapsed, wire_offset = 0, 0.0, torch.zeros(2, dtype=torch.float64)
    if plan.resume_path:
        extra = engine.load_checkpoint(plan.resume_path)
        sampler.load_state_dict(extra["data"])
        step, elapsed = int(extra["step"]), float(extra["elapsed_s"])
        wire_offset = torch.tensor(extra["wire_bytes"], dtype=torch.float64)
    start_step = step
    stats_start = engine.stats.totals()
    bf16_step = bf16_bytes_per_step(engine)
    tokens_per_step = t.batch_size * t.seq_len

    def wire_this_rank() -> torch.Tensor:  # bytes sent by this rank's engine since this process began
        now = engine.stats.totals()
        return torch.tensor([now["intra"] - stats_start["intra"], now["inter"] - stats_start["inter"]],
                            dtype=torch.float64)

    log = None
    if rank0:
        print(_banner(plan, engine, model, train_data, val_batches, start_step), flush=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        log = RunLogger(out_dir, t.steps, start_step, resumed=bool(plan.resume_path))

    def save(step: int, wire: torch.Tensor) -> Path:
        path = out_dir / "checkpoints" / f"step_{step:06d}"
        engine.save_checkpoint(path, {"step": step, "data": sampler.state_dict(), "elapsed_s": elapsed,
                                      "wire_bytes": wire.tolist()})
        if rank0:
            for old in checkpoint_dirs(out_dir)[: -t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    model.train()
    loss_sum, loss_steps, window_time, window_start = 0.0, 0, 0.0, step
    val_loss, train_loss, checkpoint = float("nan"), float("nan"), None
    wire = wire_offset.clone()
    stopped = False
    while step < t.steps and not stopped:
        t0 = time.perf_counter()
        lr = lr_at(step, o, t.steps)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(plan.accum):
            x, y = sampler.next_batch(plan.micro_batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = micro == plan.accum - 1
            with contextlib.nullcontext() if last else engine.no_sync():
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) / plan.accum
                loss.backward()
            step_loss += loss.detach()
        result = engine.step(lr=lr)
        engine.zero_grad()
        step += 1
        # One small all-reduce per step: mean loss, whether any rank was asked to stop, bytes on the wire.
        shared = torch.cat([step_loss.reshape(1).cpu(), torch.tensor([float(stop.requested)], dtype=torch.float64),
                            wire_this_rank()]).to(device)
        dist.all_reduce(shared, group=topo.world_group)
        shared = shared.cpu()
        train_loss = float(shared[0]) / topo.world_size
        stopped = bool(shared[1] > 0)
        wire = wire_offset + shared[2:]
        dt = time.perf_counter() - t0
        elapsed += dt
        loss_sum, loss_steps, window_time = loss_sum + train_loss, loss_steps + 1, window_time + dt

        final = step == t.steps
        evaluated = bool(val_batches) and not stopped and (final or (t.eval_interval and step % t.eval_interval == 0))
        if evaluated:
            val_loss = evaluate(model, val_batches, device, topo.world_group)
        bf16_total = bf16_step * step
        if log is not None:
            tok_s = (step - window_start) * tokens_per_step / max(window_time, 1e-9)
            log.progress(step, f"loss {train_loss:.3f} | {tok_s:,.0f} tok/s | wire {fmt_bytes(wire.sum())} "
                               f"(bf16 {fmt_bytes(bf16_total)})")
            if final or stopped or evaluated or step == 1 or step % t.log_interval == 0:
                record = {"step": step, "loss": round(loss_sum / loss_steps, 5), "lr": lr,
                          "tokens_per_s": round(tok_s, 1), "grad_norm": round(result.grad_norm, 5),
                          "wire_intra_bytes": int(wire[0]), "wire_inter_bytes": int(wire[1]),
                          "wire_bf16_bytes": bf16_total, "skipped_steps": engine.skipped_steps,
                          "elapsed_s": round(elapsed, 2)}
                if evaluated:
                    record["val_loss"] = round(val_loss, 5)
                log.log(record)
                loss_sum, loss_steps, window_time, window_start = 0.0, 0, 0.0, step
        if final or stopped or (t.checkpoint_interval and step % t.checkpoint_interval == 0):
            checkpoint = save(step, wire)

    summary = {"step": step, "stopped": stopped, "loss": train_loss, "val_loss": val_loss,
               "wire_bytes": wire.tolist(), "wire_bf16_bytes": bf16_step * step, "elapsed_s": elapsed,
               "skipped_steps": engine.skipped_steps, "checkpoint": str(checkpoint) if checkpoint else None,
               "dtype": str(dtype).removeprefix("torch.")}
    if log is not None:
        log.close()
        _finish(plan, model, summary, out_dir, device)
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


def _banner(plan: RunPlan, engine: ShardedDataParallel, model: torch.nn.Module, train_data: Any,
            val_batches: list, start_step: int) -> str:
    cfg, t, topo = plan.cfg, plan.cfg.train, engine.topo
    val = f"{sum(y.numel() for _, y in val_batches) * topo.world_size:,} validation tokens" if val_batches \
        else "no validation data"
    lines = [
        f"model {cfg.model.name}: {model.num_params() / 1e6:.2f}M parameters, "
        f"{str(next(model.parameters()).dtype).removeprefix('torch.')}",
        f"ranks: {topo.world_size} ({topo.describe()})",
        f"preset {t.preset}: {engine.comm.describe()}",
        f"data: {plan.train_path} ({len(train_data):,} tokens), {val}",
        f"batch: {t.batch_size} x {t.seq_len} tokens = {t.batch_size * t.seq_len:,} tokens/step "
        f"({plan.micro_batch} per rank per pass, {plan.accum} accumulation step(s)); {t.steps} steps",
        f"output: {plan.cfg.out_dir}",
    ]
    if start_step:
        lines.append(f"resuming from {plan.resume_path} at step {start_step}")
    return "\n".join(lines)


def _finish(plan: RunPlan, model: torch.nn.Module, summary: dict[str, Any], out_dir: Path,
            device: torch.device) -> None:
    """Rank 0: plot, text sample, summary lines."""
    t = plan.cfg.train
    notice = plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png",
                       f"{plan.cfg.model.name}, preset {t.preset}, {plan.world_size} ranks")
    lines = [notice] if notice else []
    if summary["stopped"]:
        lines.append(f"stopped at step {summary['step']}; checkpoint saved: {summary['checkpoint']}")
        lines.append(f"continue with: halfbyte train ... --resume (same options)")
    elif plan.tokenizer and t.sample_tokens:
        sample = _sample(plan, model, device)
        (out_dir / "sample.txt").write_text(sample)
        lines.append(f"--- sample ({t.sample_tokens} tokens) ---\n{sample.strip()}\n---")
    intra, inter = summary["wire_bytes"]
    sent, bf16 = intra + inter, summary["wire_bf16_bytes"]
    lines += [
        f"done: step {summary['step']}/{t.steps} in {fmt_time(summary['elapsed_s'])} | train loss "
        f"{summary['loss']:.3f} | val loss {summary['val_loss']:.3f} | skipped steps {summary['skipped_steps']}",
        f"wire (all ranks): {fmt_bytes(sent)} sent (inter-node {fmt_bytes(inter)}, intra-node {fmt_bytes(intra)}) "
        + (f"vs {fmt_bytes(bf16)} with bf16 communication: {bf16 / sent:.1f}x less, {fmt_bytes(bf16 - sent)} saved"
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
