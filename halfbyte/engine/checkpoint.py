"""Checkpoints: one format for every world and engine, keyed by parameter name, written atomically.

A checkpoint is a torch.distributed.checkpoint (DCP) directory whose keys follow what FSDP2 with
torch.optim produces through `torch.distributed.checkpoint.state_dict` (flattened optimizer state):

  model.<fqn>                          fp32 master weights of trainable params (full shape, saved in
                                       the pieces each rank owns); frozen params and buffers as is
  optimizer.state.<fqn>.exp_avg        AdamW moments, same pieces; `.step` the optimizer step count
  optimizer.state.<fqn>.exp_avg_sq
  optimizer.param_groups.<fqn>.<key>   lr, betas, eps, weight_decay of the parameter's group (on
                                       load the lr is restored; the others must equal the run's)
  replica.<fqn>                        the compute-dtype replica every rank holds (under qWD it lags
                                       the master by one step's quantization error: resuming needs it)
  halfbyte.engine                      step counters, seed, comm config, layout
  halfbyte.rng.<process>               this process's RNG states
  extra                                the caller's dict (data position, ...), identical on every rank
plus meta.json (what the checkpoint belongs to, readable without DCP) and COMPLETE, written last.

Because every tensor is addressed by parameter name and position inside the parameter, DCP reshards
on load: a checkpoint written by W ranks resumes on any other number of ranks, real or virtual (the
pieces a rank owns are contiguous ranges of a flat bucket, described to DCP as the rectangular
blocks they decompose into). The RNG states are restored only on the same layout of processes.
Several engines can share one checkpoint under key prefixes (islands of local updates).

Run directories (`<run>/checkpoints/step_000100/`): `step_dir`, `complete_checkpoints`, `rotate`.
All ranks write into `<path>.tmp`; after a barrier the leader writes meta.json, moves it to `<path>`
and writes COMPLETE. On several hosts `path` must be on a shared filesystem.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from halfbyte.comm.config import CommConfig
from halfbyte.engine.buffers import Bucket
from halfbyte.engine.groups import HYPER_PARAMETERS

if TYPE_CHECKING:
    from halfbyte.engine.sharded import ShardedDataParallel
    from halfbyte.engine.world import World

FORMAT_VERSION = 2
MARKER = "COMPLETE"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: the message says why and that nothing was changed."""


def dcp_cause(error: BaseException) -> str:
    """What went wrong in a failed DCP load, in one line: a CheckpointException (a BaseException, raised
    with or without a process group) wraps the first failing rank's exception. Only the first sentence
    is kept: torch's zip reader follows it with a paragraph of advice that buries our own message."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = str(error).splitlines()[0] if str(error) else "no message"
    first_sentence = re.split(r"\.\s", text, maxsplit=1)[0]
    return f"{type(error).__name__}: {first_sentence}"


def unreadable(path: Path, error: BaseException, *, nothing_loaded: bool = False) -> CheckpointError:
    """The one-line error for a DCP load of `path` that failed with `error` (every loader raises it)."""
    tail = "; nothing was loaded" if nothing_loaded else ""
    return CheckpointError(f"checkpoint {path} could not be read ({dcp_cause(error)}): it is damaged{tail}")


# ---- pieces of a parameter-shaped tensor --------------------------------------------------------
def flat_blocks(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Split the flat range [start, stop) of a row-major tensor of `shape` into rectangular blocks
    (offsets, sizes, flat start). Every block is contiguous in memory; there are at most
    2 * len(shape) - 1 of them."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (stop - start,) * len(shape), start)]
    inner = math.prod(shape[1:])
    row = start // inner
    if row == (stop - 1) // inner and stop - start < inner:  # inside one row
        return [((row, *o), (1, *s), f + row * inner)
                for o, s, f in flat_blocks(shape[1:], start - row * inner, stop - row * inner)]
    row_start, row_stop = -(-start // inner) * inner, stop // inner * inner
    blocks = flat_blocks(shape, start, row_start)  # the partial head row (none when aligned)
    if row_stop > row_start:
        blocks.append(((row_start // inner, *(0,) * (len(shape) - 1)),
                       ((row_stop - row_start) // inner, *shape[1:]), row_start))
    return blocks + flat_blocks(shape, row_stop, stop)  # the partial tail row


class Pieces:
    """A tensor of `shape` of which this process holds some flat ranges, each a 1-D view into its
    own storage (e.g. a master shard). DCP sees the rectangular blocks the ranges decompose into,
    through its checkpointable protocol, so a load into another set of ranges reshards."""

    def __init__(self, shape: torch.Size, ranges: list[tuple[int, torch.Tensor]]) -> None:
        """ranges: (flat start inside the tensor, 1-D view of the values from there)."""
        self.shape = torch.Size(shape)
        self.blocks: dict[tuple[int, ...], torch.Tensor] = {}
        for start, view in ranges:
            for offsets, sizes, flat in flat_blocks(tuple(self.shape), start, start + view.numel()):
                self.blocks[offsets] = view[flat - start: flat - start + math.prod(sizes)].view(sizes)

    def size(self) -> torch.Size:
        return self.shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=b.shape) for o, b in self.blocks.items()]

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(o), sizes=b.shape),
                              properties=TensorProperties.create_from_tensor(b), size=self.shape))
                for o, b in self.blocks.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.blocks[tuple(index.offset)]


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, Pieces) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        pieces = {k: v for k, v in state_dict.items() if isinstance(v, Pieces)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        # DCP's set-up replaces values that are not tensors with None; the keys are flat already.
        state_dict.update(pieces)
        self.state_dict.update(pieces)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, Pieces) else super().lookup_tensor(index)


def _add_ranges(ranges: dict[str, list[tuple[int, torch.Tensor]]], bucket: Bucket, rank: int, lo: int,
                values: torch.Tensor) -> None:
    """values: 1-D view of positions [lo, lo + len) of `rank`'s shard of `bucket`; add the part of
    it that lies in each parameter (padding is dropped)."""
    start = rank * bucket.shard_numel + lo  # bucket-flat position of values[0]
    for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
        a, e = max(start, offset), min(start + values.numel(), offset + p.numel())
        if a < e:
            ranges[name].append((a - offset, values[a - start: e - start]))


def _pieces(engine: ShardedDataParallel, ranges: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, Pieces]:
    shapes = {name: p.shape for b in engine.buckets for name, p in zip(b.names, b.params)}
    return {name: Pieces(shapes[name], r) for name, r in ranges.items()}


def shard_pieces(engine: ShardedDataParallel, rows: list[list[torch.Tensor]]) -> dict[str, Pieces]:
    """{param fqn: Pieces} of per-(owned rank, bucket) flat shards shaped like engine.master
    (master weights, AdamW moments, ...)."""
    ranges: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for b in engine.buckets for n in b.names}
    for rank, row in zip(engine.world.owned, rows):
        for b, shard in zip(engine.buckets, row):
            _add_ranges(ranges, b, rank, 0, shard)
    return _pieces(engine, ranges)


def vector_pieces(engine: ShardedDataParallel, parts: list[tuple[int, int, torch.Tensor]]) -> dict[str, Pieces]:
    """{param fqn: Pieces} of vectors over the concatenated shards of an owned rank. parts:
    (owned index j, position q0 in the concatenation of rank owned[j]'s shards of every bucket,
    1-D tensor of the values from q0 on; values past the last shard are padding, dropped)."""
    ranges: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for b in engine.buckets for n in b.names}
    for j, q0, values in parts:
        rank, offset = engine.world.owned[j], 0
        for b in engine.buckets:  # bucket b's shard sits at [offset, offset + shard_numel)
            a, e = max(q0, offset), min(q0 + values.numel(), offset + b.shard_numel)
            if a < e:
                _add_ranges(ranges, b, rank, a - offset, values[a - q0: e - q0])
            offset += b.shard_numel
    return _pieces(engine, ranges)


# ---- one engine's state -------------------------------------------------------------------------
@dataclass
class _Template:
    """The DCP state dict of one engine: tensors that DCP fills in place, plus the byte entries."""

    tensors: dict[str, Any]
    entries: dict[str, Any]


def engine_meta(engine: ShardedDataParallel) -> dict[str, Any]:
    w = engine.world
    return {
        "params": [[n, list(p.shape)] for b in engine.buckets for n, p in zip(b.names, b.params)],
        "comm": json.loads(json.dumps(engine.comm.to_dict())),
        "comm_describe": engine.comm.describe(),
        "dtype": ",".join(sorted({str(b.replica.dtype).removeprefix("torch.") for b in engine.buckets})),
        "world": {"nodes": w.nodes, "gpus_per_node": w.gpus_per_node, "virtual": w.defers_gradients},
        "step_count": engine.step_count,
        "skipped_steps": engine.skipped_steps,
        "seed": engine.seed,
    }


def _process_key(world: World) -> str:
    """Which process's RNG: real rank r, or the one process of virtual ranks."""
    return "virtual" if world.defers_gradients else f"rank{world.owned[0]}"


def _template(engine: ShardedDataParallel, prefix: str) -> _Template:
    model = engine.module
    tensors: dict[str, Any] = {}
    masters = shard_pieces(engine, engine.master)
    moments = {m: shard_pieces(engine, getattr(engine, m)) for m in ("exp_avg", "exp_avg_sq")}
    canonical = {id(p): name for b in engine.buckets for name, p in zip(b.names, b.params)}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in canonical:  # trainable; a tied alias gets the same pieces, as torch lists both
            tensors[f"{prefix}model.{name}"] = masters[canonical[id(t)]]
        elif isinstance(t, torch.Tensor):
            tensors[f"{prefix}model.{name}"] = t.data  # frozen params and persistent buffers
    entries: dict[str, Any] = {f"{prefix}halfbyte.engine": engine_meta(engine)}
    for b in engine.buckets:
        for i, name in enumerate(b.names):
            tensors[f"{prefix}replica.{name}"] = b.param_view(b.replica, i)
            state = f"{prefix}optimizer.state.{name}"
            tensors[f"{state}.exp_avg"] = moments["exp_avg"][name]
            tensors[f"{state}.exp_avg_sq"] = moments["exp_avg_sq"][name]
            tensors[f"{state}.step"] = torch.tensor(float(engine.step_count))
            for key, value in _hyper_parameters(engine.param_groups[b.group]).items():
                entries[f"{prefix}optimizer.param_groups.{name}.{key}"] = value
    return _Template(tensors, entries)


def _hyper_parameters(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's AdamW hyper-parameters as the checkpoint stores them (Python numbers)."""
    return {"lr": float(group["lr"]), "betas": tuple(float(b) for b in group["betas"]),
            "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}


def _restore_param_groups(path: Path, engines: dict[str, ShardedDataParallel], world: World,
                          stored: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
    """Read the checkpoint's `optimizer.param_groups.<fqn>.<key>` entries (their own small DCP read,
    before any tensor) and check them against every engine's groups: within one of this run's
    groups every parameter must carry the same values (else the checkpoint was written with other
    groups), and betas, eps and weight_decay must equal the run's (they are its configuration,
    like the comm config). Returns (group, saved lr) to restore: the lr is schedule state, as in
    torch.optim's state dicts, so a resumed LR scheduler continues from it."""
    keys = {f"{prefix}optimizer.param_groups.{name}.{key}": (prefix, b.group, name, key)
            for prefix, engine in engines.items() for b in engine.buckets for name in b.names
            for key in HYPER_PARAMETERS}
    missing = sorted(k for k in keys if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this run needs (first: "
                              f"{', '.join(missing[:3])}): it was written with other settings; nothing was loaded")
    state: dict[str, Any] = dict.fromkeys(keys)
    try:
        _dcp(dcp.load, state, path, world, _LoadPlanner())
    except (Exception, CheckpointException) as e:
        raise unreadable(path, e, nothing_loaded=True) from e
    saved: dict[tuple[str, int], dict[str, tuple[str, Any]]] = {}  # (prefix, group) -> key -> (fqn, value)
    for k, (prefix, g, name, key) in keys.items():
        value = tuple(state[k]) if key == "betas" else state[k]
        first = saved.setdefault((prefix, g), {}).setdefault(key, (name, value))
        if first[1] != value:
            raise CheckpointError(f"checkpoint {path} holds {key} {first[1]} for {first[0]} and {value} for {name}, "
                                  f"which this run puts in one parameter group (param_groups[{g}]): it was "
                                  "written with other parameter groups; nothing was loaded")
    restore = []
    for (prefix, g), values in saved.items():
        group = engines[prefix].param_groups[g]
        ours = _hyper_parameters(group)
        for key, (name, value) in values.items():
            if key != "lr" and value != ours[key]:
                raise CheckpointError(
                    f"checkpoint {path} was written with {key} {value} for {name} (param_groups[{g}]), this run "
                    f"has {ours[key]}: build the engine with the checkpoint's parameter groups and values "
                    "(change them in engine.param_groups after loading); nothing was loaded")
        restore.append((group, values["lr"][1]))
    return restore


def save(path: str | Path, engines: dict[str, ShardedDataParallel], extra: dict[str, Any],
         world: World, more: dict[str, Any] | None = None) -> None:
    """Save every engine (key prefix -> engine; "" for a plain run), the caller's `extra` and `more`
    (further DCP entries: tensors, Pieces, picklable values) to the directory `path`. Collective
    over `world` (the world every process of the run is in). Replaces an existing checkpoint at
    `path` only once the new one is complete."""
    for engine in engines.values():
        if engine.in_flight:
            raise RuntimeError("checkpoint save while gradient reductions are in flight: call step() first")
        engine.wait_weights()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if world.leader:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a run that died mid-save
        tmp.mkdir(parents=True)
    world.barrier()
    state: dict[str, Any] = {"extra": dict(extra), **(more or {})}
    for prefix, engine in engines.items():
        t = _template(engine, prefix)
        state |= t.tensors | t.entries
    first = next(iter(engines.values()))
    state[f"halfbyte.rng.{_process_key(first.world)}"] = rng_state()
    _dcp(dcp.save, _pickle_dicts(state), tmp, world, _SavePlanner())
    world.barrier()
    metas = _gather_metas(engines, world)
    if world.leader:
        meta = {"format": FORMAT_VERSION, "engines": metas, "extra": _json_safe(extra)}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        publish(tmp, path)
    world.barrier()


def load(path: str | Path, engines: dict[str, ShardedDataParallel], world: World,
         more: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore what `save` wrote into `engines` (the same prefixes) and `more` (tensors and Pieces
    filled in place, other values replaced in the dict), and return `extra`. Raises
    CheckpointError, before any tensor is read, when the checkpoint is incomplete, corrupt, or was
    written for a different model or comm config; another number of ranks is resharded."""
    path = Path(path)
    meta = read_meta(path)
    saved, current = meta["engines"], _gather_metas(engines, world)
    if set(saved) != set(current):
        raise CheckpointError(f"checkpoint {path} holds {len(saved)} engine(s) ({_names(saved)}), this run "
                              f"has {len(current)} ({_names(current)}): the number of islands differs; "
                              "nothing was loaded")
    for prefix, engine in engines.items():
        check_compatible(saved[prefix], engine_meta(engine), path)
        if engine.in_flight:
            raise RuntimeError("checkpoint load while gradient reductions are in flight")
        engine.wait_weights()
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable DCP .metadata ({type(e).__name__}): it "
                              "is damaged; nothing was loaded") from None
    learning_rates = _restore_param_groups(path, engines, world, stored)
    state: dict[str, Any] = {"extra": {}, **(more or {})}
    for prefix, engine in engines.items():
        state |= _template(engine, prefix).tensors  # the engine entry is meta.json's, read above
    first = next(iter(engines.values()))
    rng_key = f"halfbyte.rng.{_process_key(first.world)}"
    same_layout = all(saved[p]["world"] == engine_meta(e)["world"] for p, e in engines.items())
    if same_layout:
        state[rng_key] = {}
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this run needs (first: "
                              f"{', '.join(missing[:3])}): it was written with other settings; nothing was loaded")
    dict_keys = [k for k, v in state.items() if isinstance(v, dict)]
    state = _pickle_dicts(state)
    try:
        _dcp(dcp.load, state, path, world, _LoadPlanner())
    except (Exception, CheckpointException) as e:  # DCP raises many kinds on damaged files
        raise unreadable(path, e) from e
    for k in dict_keys:
        state[k] = pickle.loads(state[k])
    if same_layout:
        set_rng_state(state[rng_key])
    if more is not None:
        more |= {k: state[k] for k in more}
    for group, lr in learning_rates:
        group["lr"] = lr
    for prefix, engine in engines.items():
        engine.step_count = saved[prefix]["step_count"]
        engine.skipped_steps = saved[prefix]["skipped_steps"]
        engine.zero_grad()
        engine.zero_padding_()  # a load fills the real values only
    return state["extra"]


def _gather_metas(engines: dict[str, ShardedDataParallel], world: World) -> dict[str, Any]:
    """{prefix: engine_meta} of every engine of every process (islands live in different processes)."""
    mine = {p: engine_meta(e) for p, e in engines.items()}
    if world.process_group is None:
        return mine
    every: list[Any] = [None] * dist.get_world_size(world.process_group)
    dist.all_gather_object(every, mine, group=world.process_group)
    return {p: m for metas in every for p, m in sorted(metas.items())}


def _names(d: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in d) or "none"


def _dcp(fn: Any, state: dict[str, Any], path: Path, world: World, planner: Any) -> None:
    group = world.process_group
    if group is None:
        with warnings.catch_warnings():  # DCP warns that no_dist means a single process: it does
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            fn(state, checkpoint_id=str(path), planner=planner, no_dist=True)
    else:
        fn(state, checkpoint_id=str(path), planner=planner, process_group=group)


def _pickle_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """Dict values travel as pickled bytes: DCP would flatten a dict into one key per item."""
    return {k: pickle.dumps(v) if isinstance(v, dict) else v for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """This process's RNG states (CPU, and every CUDA device's where there is one), as checkpoints
    store them under halfbyte.rng.<process>; fsdp2's checkpoints use the same form."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


# ---- the directory ------------------------------------------------------------------------------
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


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint; CheckpointError naming what is wrong otherwise."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file, not a checkpoint directory")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is missing or incomplete (no {MARKER} marker): it was "
                              "never finished, e.g. the run stopped while saving")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META} ({type(e).__name__}): "
                              "it is damaged; nothing was loaded") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "engines" not in meta:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {found!r}, this version reads {FORMAT_VERSION}; "
                              "nothing was loaded")
    if not isinstance(meta.get("extra"), dict):  # the run's step and options, which a resume and export read
        raise CheckpointError(f"checkpoint {path}: {META} lacks its run's entry (extra): it is damaged; "
                              "nothing was loaded")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} has no DCP .metadata file: it is damaged; nothing was loaded")
    return meta


def verify(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint without loading it: complete, readable metadata, and every data file at
    least as long as the metadata says. Returns meta.json; CheckpointError naming the damage."""
    path = Path(path)
    meta = read_meta(path)
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a garbage .metadata fails to unpickle in many ways
        raise CheckpointError(f"checkpoint {path} has an unreadable DCP .metadata ({type(e).__name__}): it is "
                              "damaged; nothing was loaded") from None
    needed: dict[str, int] = {}
    for info in (stored.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else -1
        if have < size:
            what = "is missing" if have < 0 else f"has {have} of its {size} bytes"
            raise CheckpointError(f"checkpoint {path}: {name} {what}: it is damaged; nothing was loaded")
    return meta


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """CheckpointError unless the checkpoint holds the same model (names, shapes) and comm config."""
    ours = {n: s for n, s in current["params"]}  # by name: the bucket order is the layout's, not the model's
    theirs = {n: s for n, s in saved["params"]}
    if ours != theirs:
        diff = sorted(set(ours) ^ set(theirs)) or sorted(n for n in ours if ours[n] != theirs[n])
        raise CheckpointError(f"checkpoint {path} is from a different model: parameter names/shapes "
                              f"differ (first differences: {diff[:5]}); nothing was loaded")
    # The same config on another layout is the same run, so compare them as on one node (where
    # two-level gradients run one level with the inter-node codec: CommConfig.for_nodes).
    def one_node(d: dict[str, Any]) -> CommConfig:
        return CommConfig.from_dict(d).for_nodes(1)[0]

    if one_node(saved["comm"]) != one_node(current["comm"]):
        raise CheckpointError(f"checkpoint {path} was written with comm config '{saved['comm_describe']}', "
                              f"this run uses '{current['comm_describe']}'; nothing was loaded")


def step_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives under a run's checkpoint directory."""
    return Path(root) / f"step_{step:06d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)
                  and (p / MARKER).is_file())


def rotate(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints under `root`; return what was deleted."""
    doomed = complete_checkpoints(root)[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed
