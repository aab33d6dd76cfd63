"""Engine checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a checkpoint directory:
  DCP files     replica buckets (identical on every rank, written once), each rank's master shards
                and AdamW state, each rank's RNG states and `extra` dict, the model's buffers
  meta.json     what the checkpoint belongs to: parameter names/shapes, world size, comm config,
                bucket layout, step counters
  COMPLETE      written last; a directory without it never loads

All ranks write into `<path>.tmp`; after a barrier rank 0 moves it to `<path>` and writes COMPLETE.
On several hosts `path` must be on a shared filesystem.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

if TYPE_CHECKING:
    from halfbyte.engine.sharded import ShardedDataParallel

FORMAT_VERSION = 1
MARKER = "COMPLETE"


def engine_meta(engine: ShardedDataParallel) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "world_size": engine.topo.world_size,
        "params": [[n, list(p.shape)] for b in engine.buckets for n, p in zip(b.names, b.params)],
        "comm": json.loads(json.dumps(engine.comm.to_dict())),
        "comm_describe": engine.comm.describe(),
        "buckets": [[len(b.params), b.shard_numel] for b in engine.buckets],
        "dtype": str(engine.buckets[0].replica.dtype),
        "step_count": engine.step_count,
        "skipped_steps": engine.skipped_steps,
    }


def _state(engine: ShardedDataParallel, extra: Any) -> dict[str, Any]:
    """The DCP state dict; rank-local entries carry the rank in their key so DCP keeps them all."""
    r = engine.topo.rank
    state: dict[str, Any] = {f"replica.{b.index}": b.replica for b in engine.buckets}
    for k, (m, ea, eas) in enumerate(zip(engine.master, engine.exp_avg, engine.exp_avg_sq)):
        state[f"master.{k}.rank{r}"] = m
        state[f"exp_avg.{k}.rank{r}"] = ea
        state[f"exp_avg_sq.{k}.rank{r}"] = eas
    persistent = engine.module.state_dict(keep_vars=True)
    for name, buf in engine.module.named_buffers():
        if name in persistent:
            state[f"buffer.{name}"] = buf
    state[f"rng.cpu.rank{r}"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng.cuda.rank{r}"] = torch.cuda.get_rng_state()
    state[f"extra.rank{r}"] = pickle.dumps(extra)  # bytes: DCP would flatten a dict into its keys
    return state


def save_checkpoint(engine: ShardedDataParallel, path: str | Path, extra: dict) -> None:
    """Save the whole training state plus the caller's `extra` (data position, ...) to `path`.
    Collective: every rank calls it. Replaces an existing checkpoint at `path` only once the new
    one is complete."""
    if any(w is not None for w in engine._grad_work):
        raise RuntimeError("save_checkpoint() while gradient reduce-scatters are in flight: call "
                           "step() first")
    engine.wait_weights()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    group = engine.topo.world_group
    is_rank0 = engine.topo.rank == 0
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a run that died mid-save
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    dcp.save(_state(engine, dict(extra)), checkpoint_id=str(tmp), process_group=group)
    dist.barrier(group=group)
    if is_rank0:
        (tmp / "meta.json").write_text(json.dumps(engine_meta(engine), indent=1))
        publish(tmp, path)
    dist.barrier(group=group)


def publish(tmp: Path, path: Path) -> None:
    """Put the fully written directory `tmp` at `path` (moving an existing one aside first) and only
    then write the completion marker: a save interrupted at any point never loads as valid."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    (path / MARKER).write_text("ok\n")
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: ShardedDataParallel, path: str | Path) -> dict:
    """Restore the state saved by save_checkpoint and return this rank's `extra`. Raises
    ValueError, before reading any tensor, when the checkpoint is incomplete or was written for a
    different model, world size, comm config or bucket layout."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise ValueError(f"checkpoint {path} is missing or incomplete (no {MARKER} marker): it was "
                         "never finished, e.g. the run stopped while saving")
    saved = json.loads((path / "meta.json").read_text())
    check_compatible(saved, engine_meta(engine), path)

    if any(w is not None for w in engine._grad_work):
        raise RuntimeError("load_checkpoint() while gradient reduce-scatters are in flight")
    engine.wait_weights()
    r = engine.topo.rank
    state = _state(engine, None)
    dcp.load(state, checkpoint_id=str(path), process_group=engine.topo.world_group)
    torch.set_rng_state(state[f"rng.cpu.rank{r}"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"rng.cuda.rank{r}"])
    engine.step_count = saved["step_count"]
    engine.skipped_steps = saved["skipped_steps"]
    engine.zero_grad()
    return pickle.loads(state[f"extra.rank{r}"])


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    if saved.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {saved.get('format')!r}, this version reads "
                         f"{FORMAT_VERSION}")
    if saved["params"] != current["params"]:
        ours = {n: s for n, s in current["params"]}
        theirs = {n: s for n, s in saved["params"]}
        diff = sorted(set(ours) ^ set(theirs)) or sorted(n for n in ours if ours[n] != theirs[n])
        raise ValueError(f"checkpoint {path} is from a different model: parameter names/shapes "
                         f"differ (first differences: {diff[:5]})")
    if saved["world_size"] != current["world_size"]:
        raise ValueError(f"checkpoint {path} was written by {saved['world_size']} ranks, this run "
                         f"has {current['world_size']}: optimizer shards cannot be re-split")
    if saved["comm"] != current["comm"]:
        raise ValueError(f"checkpoint {path} was written with comm config "
                         f"'{saved['comm_describe']}', this run uses '{current['comm_describe']}'")
    if saved["buckets"] != current["buckets"] or saved["dtype"] != current["dtype"]:
        raise ValueError(f"checkpoint {path} has a different bucket layout or dtype (bucket_numel "
                         "or the model's dtype changed)")
