"""`halfbyte train --engine fsdp2`: the training loop's ranks on PyTorch FSDP2 (`fully_shard`).

The model is sharded with halfbyte.fsdp.shard_model (fully_shard per transformer block plus the
root, halfbyte's collectives installed in FSDP2's all-gather / reduce-scatter seam) and trained with
torch.optim.AdamW on its DTensor parameters; on a GPU, FSDP2's mixed precision all-gathers bf16
weights and reduces gradients in fp32, on the CPU everything is fp32. Everything else (data,
schedule, evaluation, metrics, progress, checkpoints' directory and safety) is the loop's
(halfbyte.train.loop), through the Ranks interface.

Checkpoints have the layout of halfbyte's engine (halfbyte/engine/checkpoint.py), so either engine
resumes the other's: torch.distributed.checkpoint.state_dict's flattened state gives `model.<fqn>`
(fp32 masters) and `optimizer.state.<fqn>.{exp_avg,exp_avg_sq,step}` as the engine writes them;
`replica.<fqn>` holds what the forward all-gathers (the qWD replica where the handle keeps one, else
the master in the compute dtype) and `replica.<module>/halfbyte_counters` the seed counters;
`halfbyte.rng.rank<r>`, `extra` and meta.json (its engine entry marked "engine": "fsdp2", with the
engine's parameter list and comm config, which check_compatible compares). A resume from an fsdp2
checkpoint is bit-exact; one from the other engine restores masters, moments and data position and
restarts qWD from an exact replica (an uncompressed first all-gather), since the two engines draw
their rounding noise from different seeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from halfbyte.comm.accounting import all_gather_bytes, reduce_scatter_bytes
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology
from halfbyte.engine import AdamWConfig, StepResult, checkpoint
from halfbyte.engine.checkpoint import CheckpointError
from halfbyte.fsdp import QuantizedComms, internals, shard_blocks, shard_model
from halfbyte.fsdp.quantize import COUNTERS_KEY
from halfbyte.train.loop import (
    BF16_BYTES,
    IGNORE,
    Ranks,
    RunPlan,
    Slot,
    build_run_model,
    compute_dtype,
    run_param_groups,
    share_cpus,
    written_by,
)

#: torch.distributed.checkpoint.state_dict's flat keys: `state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
ENGINE = "fsdp2"  # meta.json's mark of an fsdp2 checkpoint (halfbyte.train.loop.written_by)


def bytes_per_step(model: nn.Module, topo: Topology, gather_bytes: int, reduce_bytes: int) -> dict[str, int]:
    """Bytes one rank sends per training step with FSDP2's own, uncompressed collectives, at
    `gather_bytes` per all-gathered and `reduce_bytes` per reduce-scattered value: for every FSDP
    parameter group, its forward all-gather, the backward one when the group reshards after
    forward, and its reduce-scatter (halfbyte.comm.accounting's formulas)."""
    M, L, W = topo.nodes, topo.gpus_per_node, topo.world_size
    names = {id(m): name for name, m in model.named_modules()}
    total, seen = {"intra": 0, "inter": 0}, set()
    for _, module in internals.fsdp_modules(model):
        for group in internals.param_groups(module):
            if id(group) in seen:  # fully_shard([a, b]): one group, listed under both
                continue
            seen.add(id(group))
            n = sum(slot.numel for slot in internals.param_slots(group, names))
            gathers = 2 if internals.reshards_after_forward(group) else 1
            for sent, times in ((all_gather_bytes(n, gather_bytes, M, L), gathers),
                                (reduce_scatter_bytes(W * n, reduce_bytes, M, L), 1)):
                for link, b in sent.items():
                    total[link] += times * b
    return total


def shard(model: nn.Module, mesh: DeviceMesh, comm: CommConfig | None, *, dtype: torch.dtype,
          gpus_per_node: int | None, seed: int) -> QuantizedComms | None:
    """fully_shard every transformer block of `model` (fp32, on its device) and then the root, with
    FSDP2's mixed precision when `dtype` is not fp32 (weights all-gathered in dtype, gradients
    reduced in fp32), and halfbyte's collectives in `comm`'s mode (shard_model). comm None: FSDP2
    alone, sharded the same way (the reference halfbyte is measured against); returns None then."""
    mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32
          else MixedPrecisionPolicy())
    if comm is None:
        shard_blocks(model, mesh, mp)
        return None
    with warnings.catch_warnings():  # a world of one: the callers say that nothing is sent
        warnings.filterwarnings("ignore", message="quantize_comms: the FSDP shard group has 1 rank")
        return shard_model(model, mesh, comm, gpus_per_node=gpus_per_node, mp_policy=mp, seed=seed)


def make_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], config: AdamWConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """torch.optim.AdamW on the (DTensor) parameters, or on parameter groups in torch.optim's format,
    with halfbyte's AdamWConfig (a group's own keys win); fused on a GPU."""
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")


def update(params: list[nn.Parameter], optim: torch.optim.Optimizer, grad_clip: float | None,
           lr: float | None = None) -> StepResult:
    """halfbyte's engine's step rule in torch: the global norm of the averaged gradients (one
    all-reduce over the DTensor shards); when it is not finite, no rank changes its weights; else
    clip to grad_clip (torch.nn.utils' arithmetic, which the engine's clip_ copies) and step. lr:
    this step's learning rate (None: the optimizer's). The caller zeroes the gradients."""
    if lr is not None:
        for group in optim.param_groups:
            group["lr"] = lr
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not math.isfinite(grad_norm):
        return StepResult(skipped=True, grad_norm=grad_norm)
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optim.step()
    return StepResult(skipped=False, grad_norm=grad_norm)


class FSDP2Ranks(Ranks):
    """One real rank (the process group is initialized: local gloo workers or torchrun) training
    the run's model under FSDP2 with halfbyte's collectives."""

    def __init__(self, plan: RunPlan) -> None:
        super().__init__(plan)
        cfg, t = plan.cfg, plan.cfg.train
        share_cpus(plan)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))
        self.leader = rank == 0
        self.dtype = compute_dtype(t.dtype, self.device)
        self.model = build_run_model(cfg, plan.vocab_size).to(self.device)  # fp32: FSDP2's masters
        self.handle = shard(self.model, init_device_mesh(self.device.type, (world,)), plan.comm, dtype=self.dtype,
                            gpus_per_node=plan.gpus_per_node, seed=t.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the groups of halfbyte's engine (train.weight_decay_on), on the DTensors fully_shard made
        self.optim = make_optimizer(run_param_groups(cfg, self.model), cfg.optim, self.device)
        torch.manual_seed(t.seed + 1 + rank)  # after the shared init: each rank its own dropout
        self.step_count, self._skipped = 0, 0
        self.models, self.comm = [self.model], plan.comm
        topo = self.handle.topo
        self.describe = (f"FSDP2, fully_shard per block + root over {topo.describe()}"
                         + ("; a world of 1: FSDP2 calls no collective, nothing is sent" if world == 1 else ""))
        self.bf16_step = world * sum(bytes_per_step(self.model, topo, BF16_BYTES, BF16_BYTES).values())
        sampler, val = self._data_of(rank)
        self.slots = [Slot(self.model, rank, sampler, self._pad(val))]
        self._start_counting()

    def _pad(self, val: list) -> list:
        """Every FSDP2 forward is collective, so every rank evaluates as many batches: ranks with
        fewer windows (k % world) add batches whose targets count nowhere (IGNORE)."""
        longest = torch.tensor([len(val)], device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        seq = self.plan.cfg.train.seq_len
        pad = (torch.zeros(1, seq, dtype=torch.long), torch.full((1, seq), IGNORE, dtype=torch.long))
        return val + [pad] * (int(longest) - len(val))

    # ---- the step -------------------------------------------------------------------------------
    def _rank(self, slot: Slot) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _accumulate(self, slot: Slot, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)  # FSDP2's no_sync: reduce-scatter only the last
        yield

    def _update(self, lr: float) -> StepResult:
        result = update(self.params, self.optim, self.plan.cfg.engine.grad_clip, lr)
        self.optim.zero_grad(set_to_none=True)
        self._skipped += result.skipped
        self.step_count += not result.skipped
        return result

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def evaluate(self) -> float:
        """The loop's evaluation, then the root's weights freed: a forward without backward leaves
        them gathered (the root does not reshard after forward), and the next step would skip its
        all-gather; resharded, every step sends the same bytes, evaluated or resumed or not."""
        loss = super().evaluate()
        self.model.reshard()
        return loss

    def check_replicas(self) -> None:
        self.handle.check_replicas()  # qWD replicas; sharded weights have one owner each

    def weights_finite(self) -> bool:
        bad = sum(int(not bool(torch.isfinite(p.to_local()).all())) for p in self.params)
        return not bool(self.all_sum(torch.tensor([float(bad)]))[0])

    def _sent(self) -> torch.Tensor:
        totals = self.handle.stats.totals()
        return torch.tensor([totals["intra"], totals["inter"], 0], dtype=torch.float64)

    def sample_model(self) -> nn.Module | None:
        """An unsharded copy on the leader (every rank takes part in gathering the weights)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.leader:
            return None
        with torch.random.fork_rng(devices=[]):  # building seeds the CPU generator: leave it as it was
            local = build_run_model(self.plan.cfg, self.plan.vocab_size)
        local.load_state_dict(full)
        return local.to(device=self.device, dtype=self.dtype)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """The engine entry of meta.json, in halfbyte's engine's form (engine_meta): its parameter
        list in that engine's order (reverse registration, its bucket order), so that either engine's
        check_compatible compares the two equal."""
        topo, t = self.handle.topo, self.plan.cfg.train
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return {"engine": ENGINE, "params": [[n, list(p.shape)] for n, p in reversed(named)],
                "comm": json.loads(json.dumps(self.comm.to_dict())), "comm_describe": self.comm.describe(),
                "dtype": str(self.dtype).removeprefix("torch."),
                "world": {"nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "virtual": False},
                "step_count": self.step_count, "skipped_steps": self._skipped, "seed": t.seed}

    def _replicas(self) -> dict[str, torch.Tensor]:
        """replica.<fqn> of every trainable parameter (the qWD replica, or the master in the compute
        dtype: what an uncompressed all-gather delivers) and the groups' seed counters."""
        kept = self.handle.replica_state_dict()
        out = {k: v for k, v in kept.items() if k.endswith(COUNTERS_KEY)}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                out[name] = kept[name] if name in kept else p.detach().to(self.dtype)
        return out

    def _state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(model state, flat optimizer state, both as DCP entries under the engine's key names)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optim, options=FLAT)
        entries = {f"model.{k}": v for k, v in model_sd.items()} | {f"optimizer.{k}": v for k, v in optim_sd.items()}
        return model_sd, optim_sd, entries

    def _save(self, path: Path, extra: dict[str, Any]) -> None:
        """checkpoint.save's protocol: every rank writes into <path>.tmp, the leader adds meta.json
        and publishes (COMPLETE last). Dicts travel pickled, as there (DCP would flatten them)."""
        meta = self._meta()
        state = self._state()[2] | {f"replica.{k}": v for k, v in self._replicas().items()}
        state |= {"extra": pickle.dumps(extra), "halfbyte.engine": pickle.dumps(meta),
                  f"halfbyte.rng.rank{dist.get_rank()}": pickle.dumps(checkpoint.rng_state())}
        tmp = path.with_name(path.name + ".tmp")
        if self.leader:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a run that died mid-save
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()
        if self.leader:
            record = {"format": checkpoint.FORMAT_VERSION, "engines": {"": meta},
                      "extra": json.loads(json.dumps(extra, default=repr))}
            (tmp / checkpoint.META).write_text(json.dumps(record, indent=1))
            checkpoint.publish(tmp, path)
        dist.barrier()

    def _load(self, path: Path) -> dict[str, Any]:
        meta = checkpoint.read_meta(path)
        if len(meta["engines"]) != 1:
            raise CheckpointError(f"checkpoint {path} holds {len(meta['engines'])} engines (islands of local "
                                  "updates); --engine fsdp2 runs one; nothing was loaded")
        saved, mine = next(iter(meta["engines"].values())), self._meta()
        checkpoint.check_compatible(saved, mine, path)
        try:
            stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as e:  # a garbage .metadata fails to unpickle in many ways
            raise CheckpointError(f"checkpoint {path} has an unreadable DCP .metadata ({type(e).__name__}): it "
                                  "is damaged; nothing was loaded") from None
        model_sd, optim_sd, entries = self._state()
        # the optimizer's hyper-parameters are the run's (its config may not change on resume)
        tensors = {k: v for k, v in entries.items() if not k.startswith("optimizer.param_groups.")}
        replica_keys = self._replica_keys(stored) if written_by(meta) == ENGINE else []
        tensors |= {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype, device=self.device)
                    for k in replica_keys}
        rng_key = f"halfbyte.rng.rank{dist.get_rank()}"
        same_layout = saved["world"] == mine["world"]  # RNG states belong to one layout of processes
        objects = {"extra": {}} | ({rng_key: {}} if same_layout else {})
        missing = sorted(k for k in tensors | objects if k not in stored)
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this run needs (first: "
                                  f"{', '.join(missing[:3])}): it was written with other settings; nothing was loaded")
        state = tensors | {k: pickle.dumps(v) for k, v in objects.items()}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's own CheckpointException is a BaseException
            raise checkpoint.unreadable(path, e) from e
        set_state_dict(self.model, self.optim, model_state_dict=model_sd, optim_state_dict=optim_sd, options=FLAT)
        if replica_keys:  # after the weights: a replica saved as current is marked as matching them
            self.handle.load_replica_state_dict({k.removeprefix("replica."): state[k] for k in replica_keys})
        self.step_count, self._skipped = saved["step_count"], saved["skipped_steps"]
        if same_layout:
            checkpoint.set_rng_state(pickle.loads(state[rng_key]))
        return pickle.loads(state["extra"])

    def _replica_keys(self, stored: dict[str, Any]) -> list[str]:
        """The replica.* entries an fsdp2 checkpoint restores into the handle: the seed counters
        whenever something is quantized, the replicas themselves under qWD only (elsewhere they are
        the masters' cast, for the other engine)."""
        c = self.comm
        if c.weights == "full" and c.grads == "full":
            return []
        return sorted(k for k in stored if k.startswith("replica.")
                      and (k.endswith(COUNTERS_KEY) or c.weights == "qwd"))
