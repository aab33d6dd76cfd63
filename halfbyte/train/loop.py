"""The training loop, one for every layout and engine: this process plays one real rank of a
torch.distributed job or all W virtual ranks, in one island or several (local updates), under
halfbyte's engine or PyTorch FSDP2 (train.engine). `Ranks` is the engine-neutral interface the loop
drives (HalfbyteRanks here, FSDP2Ranks in halfbyte.train.fsdp2 build the worlds, models and
engines); the loop (`train`) runs the schedule, evaluation, checkpoints and, on the leader,
progress, metrics, the loss plot, a text sample and the final summary."""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from halfbyte.comm import CommConfig, all_gather_bytes, build_topology, reduce_scatter_bytes
from halfbyte.engine import ShardedDataParallel, StepResult, checkpoint
from halfbyte.engine.outer import LocalUpdates, build_islands, virtual_islands
from halfbyte.engine.world import ProcessGroupWorld, VirtualWorld, World
from halfbyte.train import rundir
from halfbyte.train.config import Config, ScheduleConfig
from halfbyte.train.data import open_tokens
from halfbyte.train.metrics import RunLogger, fmt_bytes, fmt_time, plot_loss
from halfbyte.train.model import build_model, generate, gpt_param_groups
from halfbyte.train.sampling import TokenSampler, eval_batches
from halfbyte.train.tokenizer import load_tokenizer

BF16_BYTES = 2
SAMPLE_PROMPT = "ROMEO:\n"  # for the built-in corpus; other data starts the sample at a document break
MAX_SKIPPED_IN_A_ROW = 10  # a run that keeps skipping steps (non-finite gradients) stops
IGNORE = -100  # a validation target that counts in no loss (cross_entropy's ignore_index)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. its gradients stay non-finite); the message says why and what to do."""


@dataclass
class RunPlan:
    """Everything the workers need, resolved and checked in the launching process (picklable)."""

    cfg: Config
    comm: CommConfig  # cfg.comm on this layout (CommConfig.for_nodes)
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
    notes: list[str] = field(default_factory=list)  # printed in the banner
    previous_run: str | None = None  # --overwrite: the earlier run, deleted after the first checkpoint
    user_error_dir: str | None = None  # local workers leave a user-facing failure's message here (cli)


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to the peak lr, then cosine decay to min_lr at the last step. A run extended on
    resume (--train.replan) decays from the lr it had reached at `restart_step` to the new end."""

    peak: float
    config: ScheduleConfig
    total_steps: int
    restart_step: int = 0
    restart_lr: float | None = None

    def lr(self, step: int) -> float:
        """The learning rate of 0-based step `step`."""
        s, low = self.config, self.config.min_lr
        if self.restart_lr is not None and step >= self.restart_step:
            progress = (step - self.restart_step) / max(1, self.total_steps - self.restart_step)
            return low + 0.5 * (self.restart_lr - low) * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if step < s.warmup_steps:
            return self.peak * (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, self.total_steps - s.warmup_steps))
        return low + 0.5 * (self.peak - low) * (1.0 + math.cos(math.pi * progress))

    def extended(self, step: int, total_steps: int) -> Schedule:
        """The schedule re-planned at `step` to end at `total_steps` (lr continuous at `step`)."""
        return Schedule(self.peak, self.config, total_steps, step, self.lr(step))


class StopRequest:
    """SIGINT / SIGTERM only set a flag; the loop stops at the next step boundary, on every rank at once,
    and saves a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


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


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_run_model(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The run's model on the CPU in fp32, initialized from the run's seed (every rank alike)."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    return build_model(m.name, -(-vocab_size // 64) * 64, n_layer=m.n_layer, n_head=m.n_head,
                       d_model=m.d_model, ctx=m.ctx, rope=m.rope, dropout=m.dropout)


def run_param_groups(cfg: Config, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for train.weight_decay_on, in torch.optim's format (both
    engines take them): matrices: gpt_param_groups (optim.weight_decay on the linear layers' weight
    matrices, none on embeddings, norms and biases; an empty group left out); all: one group of every
    trainable parameter with optim.weight_decay."""
    if cfg.train.weight_decay_on == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.optim.weight_decay}]
    return [g for g in gpt_param_groups(model, cfg.optim.weight_decay) if g["params"]]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


@torch.no_grad()
def _eval_sums(model: torch.nn.Module, batches: list, device: torch.device) -> torch.Tensor:
    """[loss sum, token count] of one rank's validation batches (targets equal to IGNORE count in
    neither: an engine whose forward is collective pads the ranks' batch lists to one length)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        logits = model(x.to(device))
        y = y.to(device).flatten()
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y, reduction="sum", ignore_index=IGNORE)
        total[1] += (y != IGNORE).sum()
    model.train()
    return total


@dataclass
class Slot:
    """One data-parallel rank this process plays: the model it computes with and the data it draws."""

    model: torch.nn.Module
    global_rank: int
    sampler: TokenSampler
    val_batches: list


class Ranks(abc.ABC):
    """The ranks this process plays and the engine that trains them: all the loop (`train`) drives.

    The loop is engine-neutral; it calls train_step, flush_outer, all_sum, evaluate, eval_tokens, check_replicas,
    weights_finite, wire, save, load and sample_model. This class holds what every engine shares: the
    data each rank draws, the micro-batch loop of a step, evaluation and the byte counters. An engine
    implements the hooks below (`_rank`, `_accumulate`, `_update`, `_sent`, `_save`, `_load`, ...):
    HalfbyteRanks (halfbyte's ShardedDataParallel on real or virtual ranks, islands included) and
    FSDP2Ranks (halfbyte.train.fsdp2: PyTorch FSDP2 with halfbyte's collectives, real ranks).

    Subclasses set: device, leader (prints and owns the run directory), dtype (compute dtype: the
    weights forward sees), comm (what travels), describe (the layout, for the banner), models (one
    per island held; models[0] is the one named in the banner), slots, bf16_step (bytes all ranks
    would send per step with bf16 communication), then call _start_counting().
    """

    plan: RunPlan
    device: torch.device
    leader: bool
    dtype: torch.dtype
    comm: CommConfig
    describe: str
    models: list[torch.nn.Module]
    slots: list[Slot]
    bf16_step: int

    def __init__(self, plan: RunPlan) -> None:
        t = plan.cfg.train
        self.plan = plan
        self.train_data = open_tokens(plan.train_path)
        self._val = open_tokens(plan.val_path) if plan.val_path else None
        self.has_val = self._val is not None
        self._windows = t.eval_tokens // t.seq_len

    def _data_of(self, global_rank: int) -> tuple[TokenSampler, list]:
        """The training sampler and validation batches of one global rank (the same for every engine
        and layout: see sampling.py)."""
        t, W = self.plan.cfg.train, self.plan.world_size
        sampler = TokenSampler(self.train_data, t.seq_len, global_rank, W, t.seed)
        val = ([] if self._val is None else
               eval_batches(self._val, t.seq_len, global_rank, W, self.plan.micro_batch, self._windows))
        return sampler, val

    def _start_counting(self) -> None:
        self._wire_start = self._sent()

    # ---- what an engine implements --------------------------------------------------------------
    @abc.abstractmethod
    def _rank(self, slot: Slot) -> contextlib.AbstractContextManager:
        """Around all micro-batches of one slot's step."""

    @abc.abstractmethod
    def _accumulate(self, slot: Slot, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: only the last one communicates."""

    @abc.abstractmethod
    def _update(self, lr: float) -> StepResult:
        """After every slot's backward passes: reduce, clip, optimizer step (or skip), zero grads."""

    @abc.abstractmethod
    def check_replicas(self) -> None:
        """Raise RuntimeError if the ranks' copies of the weights differ (one collective)."""

    @abc.abstractmethod
    def weights_finite(self) -> bool:
        """Every master weight of every rank is finite (one all-reduce)."""

    @abc.abstractmethod
    def _sent(self) -> torch.Tensor:
        """[intra, inter, inter-island] bytes the ranks of this process sent so far."""

    @abc.abstractmethod
    def _save(self, path: Path, extra: dict[str, Any]) -> None:
        """Write the checkpoint directory `path` (halfbyte.engine.checkpoint's layout). Collective."""

    @abc.abstractmethod
    def _load(self, path: Path) -> dict[str, Any]:
        """Restore a checkpoint into the engine and return its extra; CheckpointError if it cannot."""

    @property
    @abc.abstractmethod
    def skipped_steps(self) -> int:
        """Steps skipped so far for a non-finite gradient norm (resumed runs included)."""

    @property
    def outer_steps(self) -> int:
        return 0

    def flush_outer(self) -> None:
        """Apply an outer exchange still in flight (collective; local updates with a delay): called
        after the last step's update, so a run ends on the outer weights it paid the bytes for."""

    @abc.abstractmethod
    def sample_model(self) -> torch.nn.Module | None:
        """A model the leader can generate the text sample with, alone (None elsewhere). Collective."""

    # ---- shared ---------------------------------------------------------------------------------
    def train_step(self, lr: float) -> tuple[torch.Tensor, StepResult]:
        """Forward/backward of every rank's micro-batches, then the engine's update. Returns this
        process's loss sum (over its ranks) and the update's result."""
        plan, step_loss = self.plan, torch.zeros((), dtype=torch.float64, device=self.device)
        for slot in self.slots:
            with self._rank(slot):
                for micro in range(plan.accum):
                    x, y = slot.sampler.next_batch(plan.micro_batch)
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    with self._accumulate(slot, last=micro == plan.accum - 1):
                        loss = _loss(slot.model, x, y) / plan.accum
                        loss.backward()
                    step_loss += loss.detach()
        return step_loss, self._update(lr)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over every process (virtual ranks: this process holds all of them already)."""
        if self.plan.virtual:
            return values.cpu()
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def evaluate(self) -> float:
        total = torch.zeros(2, dtype=torch.float64)
        for slot in self.slots:
            total += _eval_sums(slot.model, slot.val_batches, self.device).cpu()
        total = self.all_sum(total)
        return float(total[0] / total[1])

    def eval_tokens(self) -> int:
        mine = sum(int((y != IGNORE).sum()) for slot in self.slots for _, y in slot.val_batches)
        return int(self.all_sum(torch.tensor([float(mine)]))[0])

    def wire(self) -> torch.Tensor:
        """[intra, inter, inter-island] bytes the ranks of this process sent since it started."""
        return self._sent() - self._wire_start

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        self._save(path, {**extra, "data": self.slots[0].sampler.state_dict()})  # every rank draws alike

    def load(self, path: str) -> dict[str, Any]:
        extra = self._load(Path(path))
        for slot in self.slots:
            slot.sampler.load_state_dict(extra["data"])
        self._wire_start = self._sent()
        return extra


@dataclass
class EngineSlot(Slot):
    """A slot of halfbyte's engine: which engine (island) it belongs to and its rank there."""

    engine: ShardedDataParallel
    local_rank: int


class HalfbyteRanks(Ranks):
    """halfbyte's ShardedDataParallel: one real rank (the process group is initialized), or all W
    virtual ranks; with local updates, in K islands (one engine and model copy per island held)."""

    slots: list[EngineSlot]

    def __init__(self, plan: RunPlan) -> None:
        super().__init__(plan)
        t, cfg = plan.cfg.train, plan.cfg
        W, K = plan.world_size, plan.islands or 1
        S = W // K
        if plan.virtual:
            choice = t.device if t.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
            device = torch.device(choice)
            L = plan.gpus_per_node or 1
            if plan.islands:
                islands = virtual_islands(K, S, L, device)
            worlds: list[World] = islands.worlds if plan.islands else [VirtualWorld(W, L, device)]
        else:
            share_cpus(plan)
            if plan.islands:
                islands = build_islands(K, plan.gpus_per_node)
            worlds = islands.worlds if plan.islands else [ProcessGroupWorld(build_topology(plan.gpus_per_node))]
            device = worlds[0].device
        self.islands = islands if plan.islands else None
        self.world = islands.world if plan.islands else worlds[0]  # what every process is in
        self.device, self.leader = device, self.world.leader
        self.dtype = compute_dtype(t.dtype, device)
        held = islands.owned if plan.islands else (0,)
        self.models = [build_run_model(cfg, plan.vocab_size).to(device=device, dtype=self.dtype) for _ in held]
        # each island its own rounding seed, so that rank l of every island draws its own noise
        self.engines = [ShardedDataParallel(model, world, optim=cfg.optim, comm=plan.comm,
                                            bucket_numel=cfg.engine.bucket_numel, grad_clip=cfg.engine.grad_clip,
                                            seed=t.seed + 7919 * k, param_groups=run_param_groups(cfg, model))
                        for k, model, world in zip(held, self.models, worlds)]
        if not plan.virtual:
            torch.manual_seed(t.seed + 1 + dist.get_rank())  # after the shared init: each rank its own dropout
        self.local = LocalUpdates(self.engines, islands, cfg.outer, seed=t.seed) if plan.islands else None
        self.comm = plan.comm
        self.describe = (f"{islands.describe()}; {cfg.outer.describe()}" if plan.islands
                         else worlds[0].describe())
        per_node = plan.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", W))
        self.bf16_step = bf16_bytes_per_step(self.engines[0].buckets, W // per_node, per_node)
        self.slots = [EngineSlot(model, k * S + l, *self._data_of(k * S + l), engine, l)
                      for k, model, engine in zip(held, self.models, self.engines) for l in engine.world.owned]
        self._start_counting()

    @property
    def engine(self) -> ShardedDataParallel:
        return self.engines[0]

    @property
    def outer_steps(self) -> int:
        return self.local.outer_steps if self.local else 0

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    def _rank(self, slot: EngineSlot) -> contextlib.AbstractContextManager:
        return slot.engine.as_rank(slot.local_rank)

    def _accumulate(self, slot: EngineSlot, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else slot.engine.no_sync()

    def flush_outer(self) -> None:
        if self.local is not None:
            self.local.flush()

    def _update(self, lr: float) -> StepResult:
        results = [engine.step(lr=lr) for engine in self.engines]
        if self.local is not None:
            self.local.step(lr)
        for engine in self.engines:
            engine.zero_grad()
        return results[0]

    def check_replicas(self) -> None:
        for engine in self.engines:
            engine.check_replicas()

    def weights_finite(self) -> bool:
        bad = sum(int(not bool(torch.isfinite(m).all())) for e in self.engines for row in e.master for m in row)
        return not bool(self.all_sum(torch.tensor([float(bad)]))[0])

    def _sent(self) -> torch.Tensor:
        intra = sum(e.stats.totals()["intra"] for e in self.engines)
        inter = sum(e.stats.totals()["inter"] for e in self.engines)
        island = sum(self.local.stats.totals().values()) if self.local else 0
        return torch.tensor([intra, inter, island], dtype=torch.float64)

    def _save(self, path: Path, extra: dict[str, Any]) -> None:
        if self.local is not None:
            self.local.save_checkpoint(path, extra)
        else:
            self.engine.save_checkpoint(path, extra)

    def _load(self, path: Path) -> dict[str, Any]:
        extra = self.local.load_checkpoint(path) if self.local else self.engine.load_checkpoint(path)
        if written_by(checkpoint.read_meta(path)) != "halfbyte":
            # FSDP2's qWD replica lags its master by the last update (it catches up in the next
            # forward): start this engine's qWD from the exact masters instead
            for engine in self.engines:
                engine.refresh_replica()
        return extra

    def sample_model(self) -> torch.nn.Module | None:
        return self.models[0] if self.leader else None


def written_by(meta: dict[str, Any]) -> str:
    """Which trainer engine wrote a checkpoint, from its meta.json: FSDP2Ranks marks its engine
    entry; halfbyte's engine writes none."""
    return next(iter(meta["engines"].values())).get("engine", "halfbyte")


def share_cpus(plan: RunPlan) -> None:
    """Local workers share the CPUs this process may use (taskset / cgroup aware)."""
    if plan.local_workers and "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // plan.world_size))


def make_ranks(plan: RunPlan) -> Ranks:
    """The ranks of this process under the run's engine (train.engine)."""
    if plan.cfg.train.engine == "fsdp2":
        from halfbyte.train.fsdp2 import FSDP2Ranks  # imports FSDP2 only for FSDP2 runs

        return FSDP2Ranks(plan)
    return HalfbyteRanks(plan)


def use_deterministic_kernels() -> None:
    """Deterministic kernels from here on (train.deterministic). Called before the model reaches the
    GPU: cuBLAS reads its workspace setting when this process creates its first handle."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def run(plan: RunPlan) -> dict[str, Any]:
    """Train this process's ranks (for real ranks the process group is initialized). Returns the
    summary."""
    stop = StopRequest()  # first: a Ctrl-C during start-up also ends in a clean stop after one step
    if plan.cfg.train.deterministic:
        use_deterministic_kernels()
    logging.getLogger("halfbyte.engine.sharded").setLevel(logging.ERROR)  # the loop reports skips itself
    return train(plan, make_ranks(plan), stop)


@dataclass
class Window:
    """The steps since the last metrics record, for its mean loss and throughput."""

    start: int  # the step it follows
    loss_sum: float = 0.0
    loss_steps: int = 0
    time: float = 0.0  # seconds in its steps

    def add(self, dt: float, loss: float | None) -> None:
        """One step of `dt` seconds; `loss` None for a skipped step (its loss is not finite: it stays out
        of the mean)."""
        if loss is not None:
            self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1
        self.time += dt

    def tokens_per_s(self, step: int, tokens_per_step: int) -> float:
        return (step - self.start) * tokens_per_step / max(self.time, 1e-9)


@dataclass
class RunState:
    """The loop's counters. Those a checkpoint carries (step, elapsed, the bytes sent and bf16's, the
    schedule) are restored on resume (`_start_state`); the others start afresh in every process."""

    schedule: Schedule
    bf16_step: int  # bytes all ranks would send per step with bf16 communication, on this layout
    step: int = 0  # steps done
    elapsed: float = 0.0  # seconds in training steps, the resumed run's included
    # [intra, inter, inter-island] bytes all ranks sent before this process started
    wire_offset: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    bf16_offset: int = 0  # bf16's bytes before this process started (the layout may have changed)
    train_loss: float = math.nan  # the last step's, the mean over the ranks
    val_loss: float = math.nan  # the last evaluation's
    stopped: bool = False  # a rank was asked to stop (SIGINT / SIGTERM)
    skipped_in_a_row: int = 0
    checkpoint: Path | None = None  # the newest one this process wrote
    start_step: int = field(init=False)
    wire: torch.Tensor = field(init=False)  # [intra, inter, inter-island] bytes all ranks sent so far
    window: Window = field(init=False)

    def __post_init__(self) -> None:
        self.start_step, self.wire, self.window = self.step, self.wire_offset.clone(), Window(self.step)

    @property
    def bf16_bytes(self) -> int:
        """Bytes bf16 communication would have sent by now (on the layouts the run had)."""
        return self.bf16_offset + self.bf16_step * (self.step - self.start_step)


def train(plan: RunPlan, ranks: Ranks, stop: StopRequest) -> dict[str, Any]:
    """Train from step 0 or the resumed checkpoint's step to train.steps, or until a rank is asked to
    stop, evaluating, logging and checkpointing on the way. Returns the summary."""
    t = plan.cfg.train
    run = _start_state(plan, ranks)
    val_tokens = ranks.eval_tokens()  # collective: every rank, before the leader's banner
    log = _open_log(plan, ranks, run.start_step, val_tokens) if ranks.leader else None
    try:
        while run.step < t.steps and not run.stopped:
            t0 = time.perf_counter()
            lr = run.schedule.lr(run.step)
            step_loss, result = ranks.train_step(lr)
            if run.step + 1 == t.steps:
                ranks.flush_outer()  # before the step's byte count: the run's last exchange is in it
            _end_step(plan, ranks, run, stop, log, step_loss, result, t0)

            final = run.step == t.steps
            evaluated = ranks.has_val and not run.stopped and (final or _every(t.eval_interval, run.step))
            if evaluated:
                run.val_loss = ranks.evaluate()
            if log is not None:
                log.progress(run.step, _progress(plan, run))
                if final or run.stopped or evaluated or run.step == 1 or run.step % t.log_interval == 0:
                    log.log(_record(plan, ranks, run, lr, result, evaluated))
                    run.window = Window(run.step)
            if _every(t.check_replicas_interval, run.step):
                ranks.check_replicas()  # raises, naming the bucket, if a replica diverged
            if final or run.stopped or _every(t.checkpoint_interval, run.step):
                run.checkpoint = _save(plan, ranks, run, log) or run.checkpoint
    finally:
        if log is not None:
            log.close()
        if ranks.leader and plan.previous_run:
            rundir.restore_previous(plan.cfg.out_dir)  # the new run ended before its first checkpoint

    summary = _summary(ranks, run)
    sampling = not run.stopped and plan.tokenizer and t.sample_tokens
    model = ranks.sample_model() if sampling else None  # collective: every rank, before the leader's end
    if ranks.leader:
        _finish(plan, model, summary, plan.cfg.out_dir, ranks.device)
    return summary


def _start_state(plan: RunPlan, ranks: Ranks) -> RunState:
    """The state at step 0, or the one the resumed checkpoint carries (ranks.load restores the
    engine's state and the data order)."""
    cfg, t = plan.cfg, plan.cfg.train
    schedule = Schedule(cfg.optim.lr, cfg.schedule, t.steps)
    if not plan.resume_path:
        return RunState(schedule, ranks.bf16_step)
    extra = ranks.load(plan.resume_path)
    step = int(extra["step"])
    restart = extra.get("schedule")
    if restart is not None:
        schedule = Schedule(cfg.optim.lr, cfg.schedule, t.steps, restart["step"], restart["lr"])
    if extra["steps"] != t.steps:  # --train.replan: decay from here to the new end
        schedule = Schedule(cfg.optim.lr, cfg.schedule, extra["steps"], schedule.restart_step,
                            schedule.restart_lr).extended(step, t.steps)
    return RunState(schedule, ranks.bf16_step, step, float(extra["elapsed_s"]),
                    torch.tensor(extra["wire_bytes"], dtype=torch.float64),
                    int(extra["wire_bf16_bytes"]))  # the layout (hence bf16's bytes) may have changed


def _open_log(plan: RunPlan, ranks: Ranks, start_step: int, val_tokens: int) -> RunLogger:
    """The leader: the banner, config.json and the run's logger (progress bar, metrics.jsonl)."""
    cfg = plan.cfg
    print(_banner(plan, ranks, start_step, val_tokens), flush=True)
    (cfg.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return RunLogger(cfg.out_dir, cfg.train.steps, start_step, resumed=bool(plan.resume_path))


def _end_step(plan: RunPlan, ranks: Ranks, run: RunState, stop: StopRequest, log: RunLogger | None,
              step_loss: torch.Tensor, result: StepResult, t0: float) -> None:
    """Count the step just trained (begun at time.perf_counter() `t0`): its loss, whether to stop,
    the bytes sent, its time, and skips (a run whose gradients stay non-finite stops: TrainingStopped)."""
    run.step += 1
    # One small all-reduce per step: mean loss, whether any rank was asked to stop, bytes on the wire.
    shared = ranks.all_sum(torch.cat([step_loss.reshape(1).cpu(),
                                      torch.tensor([float(stop.requested)], dtype=torch.float64),
                                      ranks.wire()]))
    run.train_loss = float(shared[0]) / plan.world_size
    run.stopped = bool(shared[1] > 0)
    run.wire = run.wire_offset + shared[2:]
    dt = time.perf_counter() - t0
    run.elapsed += dt
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if result.skipped else 0
    if result.skipped and log is not None:
        log.note(f"step {run.step} skipped: gradient norm {result.grad_norm} ({ranks.skipped_steps} "
                 f"skipped so far, {run.skipped_in_a_row} in a row)")
    if run.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingStopped(
            f"{run.skipped_in_a_row} steps in a row had non-finite gradients (the last at step {run.step}): "
            f"the run stopped; lower --lr (now {plan.cfg.optim.lr}) or check the data. No checkpoint was "
            f"written since the skips began: the newest in {plan.cfg.out_dir / 'checkpoints'}, if any, is from before")
    run.window.add(dt, None if result.skipped else run.train_loss)


def _every(interval: int, step: int) -> bool:
    """Whether `step` ends an interval (0: never)."""
    return bool(interval) and step % interval == 0


def _progress(plan: RunPlan, run: RunState) -> str:
    """The progress bar's line for step run.step."""
    t = plan.cfg.train
    tok_s = run.window.tokens_per_s(run.step, t.batch_size * t.seq_len)
    return (f"loss {run.train_loss:.3f} | {tok_s:,.0f} tok/s | wire {fmt_bytes(run.wire.sum())} "
            f"(bf16 {fmt_bytes(run.bf16_bytes)})")


def _record(plan: RunPlan, ranks: Ranks, run: RunState, lr: float, result: StepResult,
            evaluated: bool) -> dict[str, Any]:
    """Step run.step's line of metrics.jsonl (loss and throughput: over the window since the last one)."""
    t, w = plan.cfg.train, run.window
    record = {"step": run.step, "loss": round(w.loss_sum / w.loss_steps, 5) if w.loss_steps else None, "lr": lr,
              "tokens_per_s": round(w.tokens_per_s(run.step, t.batch_size * t.seq_len), 1),
              "grad_norm": round(result.grad_norm, 5),
              "wire_intra_bytes": int(run.wire[0]), "wire_inter_bytes": int(run.wire[1]),
              "wire_bf16_bytes": run.bf16_bytes, "skipped_steps": ranks.skipped_steps,
              "elapsed_s": round(run.elapsed, 2)}
    if plan.islands:
        record |= {"outer_steps": ranks.outer_steps, "wire_island_bytes": int(run.wire[2])}
    if evaluated:
        record["val_loss"] = round(run.val_loss, 5)
    return record


def _save(plan: RunPlan, ranks: Ranks, run: RunState, log: RunLogger | None) -> Path | None:
    """Write step run.step's checkpoint (collective) and rotate the older ones; None, writing nothing,
    while the gradients or weights are not finite."""
    cfg, t = plan.cfg, plan.cfg.train
    ckpt_root = cfg.out_dir / "checkpoints"
    # read again: an evaluation of this step may have communicated (FSDP2's forward gathers), and a
    # resumed run must start from every byte sent before its checkpoint
    wire = run.wire_offset + ranks.all_sum(ranks.wire())
    if run.skipped_in_a_row or not ranks.weights_finite():
        if log is not None:
            log.note(f"step {run.step}: no checkpoint written while the gradients or weights are not finite "
                     "(the newest complete one stays the latest)")
        return None
    path = checkpoint.step_dir(ckpt_root, run.step)
    restart = (None if run.schedule.restart_lr is None
               else {"step": run.schedule.restart_step, "lr": run.schedule.restart_lr})
    ranks.save(path, {"step": run.step, "steps": t.steps, "elapsed_s": run.elapsed, "wire_bytes": wire.tolist(),
                      "wire_bf16_bytes": run.bf16_bytes, "schedule": restart, "config": cfg.to_dict()})
    if ranks.leader:
        checkpoint.rotate(ckpt_root, t.keep_checkpoints)
        if plan.previous_run:
            rundir.discard_previous(cfg.out_dir)  # --overwrite: the new run is safe now
            plan.previous_run = None
    return path


def _summary(ranks: Ranks, run: RunState) -> dict[str, Any]:
    return {"step": run.step, "stopped": run.stopped, "loss": run.train_loss, "val_loss": run.val_loss,
            "wire_bytes": run.wire.tolist(), "wire_bf16_bytes": run.bf16_bytes, "elapsed_s": run.elapsed,
            "skipped_steps": ranks.skipped_steps, "outer_steps": ranks.outer_steps,
            "checkpoint": str(run.checkpoint) if run.checkpoint else None,
            "dtype": str(ranks.dtype).removeprefix("torch.")}


def _banner(plan: RunPlan, ranks: Ranks, start_step: int, val_tokens: int) -> str:
    cfg, t = plan.cfg, plan.cfg.train
    val = f"{val_tokens:,} validation tokens" if ranks.has_val else "no validation data"
    params = sum(p.numel() for p in ranks.models[0].parameters())  # tied weights once; DTensors whole
    lines = [
        f"model {cfg.model.name}: {params / 1e6:.2f}M parameters, {str(ranks.dtype).removeprefix('torch.')}",
        f"ranks: {plan.world_size} ({ranks.describe})",
        f"preset {t.preset}: {ranks.comm.describe()}",
        f"data: {plan.train_path} ({len(ranks.train_data):,} tokens), {val}",
        f"batch: {t.batch_size} x {t.seq_len} tokens = {t.batch_size * t.seq_len:,} tokens/step "
        f"({plan.micro_batch} per rank per pass, {plan.accum} accumulation step(s)); {t.steps} steps",
        f"output: {plan.cfg.out_dir}",
        *(f"note: {n}" for n in plan.notes),
    ]
    if plan.islands and t.steps % cfg.outer.local_steps:
        lines.append(f"note: {t.steps} steps is not a multiple of --local-steps {cfg.outer.local_steps}: the "
                     "islands end apart (evaluation averages their models; the sample uses island 0's)")
    if start_step:
        lines.append(f"resuming from {plan.resume_path} at step {start_step}")
    return "\n".join(lines)


def _finish(plan: RunPlan, model: torch.nn.Module | None, summary: dict[str, Any], out_dir: Path,
            device: torch.device) -> None:
    """The leader: plot, text sample (with `model`, when there is one), summary lines."""
    t = plan.cfg.train
    ranks = f"{plan.world_size} {'virtual ' if plan.virtual else ''}ranks"
    notice = plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png",
                       f"{plan.cfg.model.name}, preset {t.preset}, {ranks}")
    lines = [notice] if notice else []
    if summary["stopped"]:
        lines.append(f"stopped at step {summary['step']}; checkpoint saved: {summary['checkpoint']}")
        lines.append("continue with: halfbyte train ... --resume auto (same options)")
    elif model is not None:
        sample = _sample(plan, model, device)
        (out_dir / "sample.txt").write_text(sample)
        lines.append(f"--- sample ({t.sample_tokens} tokens) ---\n{sample.strip()}\n---")
    intra, inter, island = summary["wire_bytes"]
    sent, bf16 = intra + inter + island, summary["wire_bf16_bytes"]
    val = f"{summary['val_loss']:.3f}" if math.isfinite(summary["val_loss"]) else "not evaluated"
    lines += [
        f"done: step {summary['step']}/{t.steps} in {fmt_time(summary['elapsed_s'])} | train loss "
        f"{summary['loss']:.3f} | val loss {val} | skipped steps {summary['skipped_steps']}",
    ]
    if plan.islands:
        u = plan.cfg.outer
        lines.append(f"local updates: {summary['outer_steps']} outer steps ({u.optimizer}, every {u.local_steps} "
                     f"steps, {plan.islands} islands); inter-island {fmt_bytes(island)} "
                     f"({island / max(summary['step'] * t.batch_size * t.seq_len, 1):.3g} B/token), "
                     f"inside islands {fmt_bytes(intra + inter)}")
    who = f"all ranks, emulated: what {plan.world_size} real ranks would send" if plan.virtual else "all ranks"
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
