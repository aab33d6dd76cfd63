"""`quantize_comms`: put halfbyte's collectives into every FSDP2 module of a model.

FSDP2's setters act on one module's parameter group and do not recurse, so this walks the model
and installs one HalfbyteAllGather / HalfbyteReduceScatter pair per parameter group, after
checking every case it cannot quantize (each raises ValueError naming the module and the fix;
nothing falls back silently). The returned QuantizedComms is the handle: byte stats, replica
check, replica state for checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from halfbyte.comm.accounting import CommStats
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology, topology_from_mesh
from halfbyte.fsdp import internals
from halfbyte.fsdp.comms import HalfbyteAllGather, HalfbyteReduceScatter

#: Key suffix of a group's counters in replica_state_dict, after the FSDP module's FQN ("/" never
#: occurs in an FQN, so the key cannot collide with a parameter's): int64 [weight counter (qWD
#: updates, or direct-mode gathers), gradient reduce-scatters, stale (qWD: the weights changed
#: since the replica was last updated)].
COUNTERS_KEY = "/halfbyte_counters"


@dataclass
class _Group:
    name: str                      # FQN of the FSDP module ("" for the root)
    group: Any                     # FSDPParamGroup
    gather: HalfbyteAllGather
    scatter: HalfbyteReduceScatter
    slots: list[internals.ParamSlot]


class QuantizedComms:
    """Handle returned by quantize_comms.

    stats: CommStats of every installed collective (bytes this rank sent per link class and op;
    the same accounting as halfbyte.engine). comm: the CommConfig in use. topo: the topology of
    the FSDP shard group.
    """

    def __init__(self, groups: list[_Group], topo: Topology, comm: CommConfig) -> None:
        self._groups, self.topo, self.comm = groups, topo, comm

    @property
    def stats(self) -> CommStats:
        return self.topo.stats

    @property
    def module_names(self) -> list[str]:
        """FQNs of the FSDP modules whose collectives are halfbyte's ("" is the root)."""
        return [g.name for g in self._groups]

    def shard_numels(self) -> dict[str, int]:
        """Values per rank of each FSDP module's flat (padded) shard: n in the accounting formulas
        (all-gather of n per rank, reduce-scatter of W * n)."""
        return {g.name: g.slots[-1].offset + g.slots[-1].numel for g in self._groups}

    def replica_nbytes(self) -> int:
        """Bytes of the qWD replicas this rank holds (0 before the first forward and in the
        direct/full weight modes)."""
        return sum(g.gather.replica.numel() * g.gather.replica.element_size()
                   for g in self._groups if g.gather.replica is not None)

    def resend_weights(self) -> None:
        """Make the next all-gather of every group send its difference even if no version counter
        moved: call it after writing parameters through `.data` (invisible to the counters)."""
        for g in self._groups:
            g.gather.sent_versions = None

    def check_replicas(self) -> None:
        """Raise RuntimeError naming the first FSDP module whose qWD replica differs between the
        ranks of its shard group (bit-exact checksums, one all-reduce). A no-op in the direct and
        full weight modes, which keep no replica."""
        held = [g for g in self._groups if g.gather.replica is not None]
        if not held:
            return
        self._sync()
        sums = []
        for g in held:
            bits = _raw_bits(g.gather.replica).to(torch.int64)
            pos = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521
            sums += [bits.sum(), (bits * pos).sum()]
        same = self._agree(torch.stack(sums))
        for i, g in enumerate(held):
            if not bool(same[2 * i:2 * i + 2].all()):
                raise RuntimeError(f"qWD replica of FSDP module {g.name or '<root>'!r} (parameters "
                                   f"{g.slots[0].fqn} ... {g.slots[-1].fqn}) differs between ranks")

    def replica_state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue bit-identically: the qWD replicas as full-shape
        tensors keyed by parameter FQN, and each group's seed counters under
        '<module fqn>/halfbyte_counters' (COUNTERS_KEY). Identical on every rank of a shard group
        (tensor-parallel parameters come as DTensors replicated over dp, sharded over tp like the
        parameter), so a checkpoint can store them as replicated tensors (e.g. under a 'replica.'
        prefix). Replicas only in the qwd weight mode after the first forward; counters only when
        something is quantized (the baseline's dict is empty)."""
        self._sync()
        out: dict[str, torch.Tensor] = {}
        if self.comm.weights == "full" and self.comm.grads == "full":
            return out
        W = self.topo.world_size
        for g in self._groups:
            gather, replica = g.gather, g.gather.replica
            stale = replica is not None and internals.shard_versions(g.group) != gather.sent_versions
            weight_counter = gather.updates if self.comm.weights == "qwd" else gather.calls
            out[g.name + COUNTERS_KEY] = torch.tensor([weight_counter, g.scatter.calls, int(stale)],
                                                      dtype=torch.int64)
            if replica is None:
                continue
            rows = replica.view(W, -1)
            for slot, fsdp_param in zip(g.slots, g.group.fsdp_params):
                chunks = rows[:, slot.offset:slot.offset + slot.numel].reshape(W, *slot.padded_size)
                full = torch.cat(list(chunks.unbind(0)), dim=slot.shard_dim)
                full = full.narrow(slot.shard_dim, 0, slot.orig_size[slot.shard_dim]).clone()
                out[slot.fqn] = internals.as_replicated(full, fsdp_param)
        return out

    def load_replica_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what replica_state_dict returned, after the model's own weights were loaded
        (a replica saved as not stale is marked as matching the weights present now). The resumed
        run then sends the same bytes with the same seeds as one that never stopped."""
        if self.comm.weights == "full" and self.comm.grads == "full":
            if state:
                raise ValueError(f"load_replica_state_dict: {self.comm.describe()} keeps no state, "
                                 f"but the state holds {len(state)} entries")
            return
        W = self.topo.world_size
        for g in self._groups:
            key = g.name + COUNTERS_KEY
            if key not in state:
                raise ValueError(f"load_replica_state_dict: no entry for {key!r}; was the state saved "
                                 "by the same model with the same CommConfig?")
            weight_counter, grad_calls, stale = (int(v) for v in state[key])
            g.scatter.calls = grad_calls
            if self.comm.weights != "qwd":
                g.gather.calls = weight_counter
                continue
            g.gather.updates = weight_counter
            missing = [s.fqn for s in g.slots if s.fqn not in state]
            if len(missing) == len(g.slots):  # saved before the first forward filled the replica
                g.gather.replica, g.gather.sent_versions = None, None
                continue
            if missing:
                raise ValueError(f"load_replica_state_dict: no entry for {missing[0]!r} (FSDP module "
                                 f"{g.name or '<root>'!r})")
            g.gather.replica = self._replica_from(g, state, W)
            g.gather.sent_versions = None if stale else internals.shard_versions(g.group)

    def _replica_from(self, g: _Group, state: dict[str, torch.Tensor], W: int) -> torch.Tensor:
        """One group's flat replica (W rows of the padded shards) from full-shape tensors."""
        device = g.group.fsdp_params[0].sharded_param.device
        per_rank = g.slots[-1].offset + g.slots[-1].numel
        replica = torch.empty(W * per_rank, dtype=internals.all_gather_dtype(g.group), device=device)
        rows = replica.view(W, per_rank)
        for slot in g.slots:
            full = state[slot.fqn]
            full = full.to_local() if hasattr(full, "to_local") else full
            if tuple(full.shape) != slot.orig_size:
                raise ValueError(f"load_replica_state_dict: {slot.fqn!r} has shape {tuple(full.shape)}, "
                                 f"the model's is {slot.orig_size}")
            d = slot.shard_dim
            padded = full.new_zeros(*slot.padded_size[:d], slot.padded_size[d] * W, *slot.padded_size[d + 1:])
            padded.narrow(d, 0, full.shape[d]).copy_(full)
            rows[:, slot.offset:slot.offset + slot.numel].copy_(
                torch.stack(padded.chunk(W, dim=d)).reshape(W, slot.numel))
        return replica

    def _sync(self) -> None:
        # The replicas are written on FSDP's all-gather stream; readers here run on the default one.
        if self.topo.device.type == "cuda":
            torch.cuda.synchronize(self.topo.device)

    def _agree(self, values: torch.Tensor) -> torch.Tensor:
        both = torch.cat([values, -values]).to(self.topo.device)  # max of (x, -x): max and -min
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.topo.world_group)
        n = values.numel()
        return (both[:n] == -both[n:]).cpu()


def quantize_comms(model: nn.Module, comm: CommConfig, topo: Topology | None = None, *,
                   seed: int = 0) -> QuantizedComms:
    """Install halfbyte's all-gather and reduce-scatter on every FSDP2 module of `model`.
    Collective (call it on every rank, after fully_shard, before the first forward; the model may
    still be on the meta device).

    comm: what travels (CommConfig.preset("sdp4bit"), ...); two-level gradients need >= 2 nodes,
    so pass comm.for_nodes(topo.nodes)[0] on one node. topo: the FSDP shard group as nodes x GPUs;
    None builds it from the modules' mesh (topology_from_mesh, gpus_per_node from the launcher's
    LOCAL_WORLD_SIZE). seed: base of every stochastic-rounding seed (see halfbyte.fsdp.comms).

    Raises ValueError for what it cannot quantize: modules sharded over different meshes, HSDP /
    replicate meshes (FSDP's own all-reduce would stay uncompressed and uncounted), several
    parameter groups on one module (per-parameter meshes from shard_placement_fn),
    reshard_after_forward=<int> (the re-gather runs over another group), a comm already set on a
    module (symmetric memory, process-group allocation, another custom comm, or halfbyte's), and,
    for quantized weights, parameters of several dtypes in one module (FSDP all-gathers them as a
    byte buffer) and all-gather extensions (fsdp_pre_all_gather, e.g. float8).
    """
    modules = internals.fsdp_modules(model)
    if not modules:
        raise ValueError("quantize_comms: the model has no fully_shard module; call fully_shard on its "
                         "blocks and root first (or use halfbyte.fsdp.shard_model)")
    names = {id(m): name for name, m in model.named_modules()}
    found = [(name, m, internals.param_groups(m)) for name, m in modules]
    for name, _, groups in found:
        _check_module(name or "<root>", groups, comm)
    # fully_shard([a, b]) shares one parameter group between a and b: install once, on the first.
    owned, seen = [], set()
    for name, m, gs in found:
        if gs and id(gs[0]) not in seen:
            seen.add(id(gs[0]))
            owned.append((name, m, gs[0]))
    if not owned:
        raise ValueError("quantize_comms: no FSDP module owns parameters")
    meshes = {tuple(dist.get_process_group_ranks(internals.shard_group(g))) for _, _, g in owned}
    if len(meshes) != 1:
        raise ValueError(f"quantize_comms: the FSDP modules shard over different groups {sorted(meshes)}; "
                         "shard every module over the same data-parallel mesh")
    if topo is None:
        topo = topology_from_mesh(internals.shard_mesh(owned[0][2]))
    expected = list(next(iter(meshes)))
    if dist.get_process_group_ranks(topo.world_group) != expected:
        raise ValueError(f"quantize_comms: topo spans ranks {dist.get_process_group_ranks(topo.world_group)} "
                         f"but FSDP shards over {expected}: build it with topology_from_mesh(dp_mesh)")
    if comm.grads == "two-level" and topo.nodes < 2:
        raise ValueError(f"CommConfig.grads='two-level' needs at least 2 nodes, but the FSDP shard group is "
                         f"{topo.nodes} node x {topo.gpus_per_node} ranks: pass comm.for_nodes(1)[0] (one "
                         "level with the inter-node codec), or emulate nodes with gpus_per_node")
    if topo.world_size == 1:
        warnings.warn("quantize_comms: the FSDP shard group has 1 rank, so FSDP2 runs no all-gather or "
                      "reduce-scatter and nothing is quantized", stacklevel=2)
    _check_same_layout(owned, names, comm, topo)
    groups = []
    for index, (name, module, group) in enumerate(owned):
        label = name or "<root>"
        gather = HalfbyteAllGather(label, index, group, topo, comm, seed)
        scatter = HalfbyteReduceScatter(label, index, group, topo, comm, seed)
        module.set_custom_all_gather(gather)
        module.set_custom_reduce_scatter(scatter)
        groups.append(_Group(name, group, gather, scatter, internals.param_slots(group, names)))
    return QuantizedComms(groups, topo, comm)


def _check_module(label: str, groups: list[Any], comm: CommConfig) -> None:
    if len(groups) > 1:
        raise ValueError(f"FSDP module {label!r} has {len(groups)} parameter groups (per-parameter meshes "
                         "from shard_placement_fn): one comm per module cannot serve them; shard those "
                         "parameters in separate fully_shard modules")
    for group in groups:
        kind = internals.mesh_kind(group)
        if kind != "fsdp":
            raise ValueError(f"FSDP module {label!r} uses a {kind} mesh: FSDP's own all-reduce across "
                             "replicas would stay uncompressed and uncounted; pass fully_shard a 1-D "
                             "data-parallel mesh")
        if internals.reshards_to_smaller_mesh(group):
            raise ValueError(f"FSDP module {label!r} has reshard_after_forward=<int>: its backward "
                             "re-gather runs over another group; use True or False")
        for comm_obj in internals.installed_comms(group):
            if isinstance(comm_obj, (HalfbyteAllGather, HalfbyteReduceScatter)):
                raise ValueError(f"FSDP module {label!r} already has halfbyte's comms: call "
                                 "quantize_comms once per model")
            if not internals.is_default_comm(comm_obj):
                raise ValueError(f"FSDP module {label!r} already has a {type(comm_obj).__name__} "
                                 "(symmetric memory, process-group allocation or a custom comm): "
                                 "halfbyte would replace it; do not enable it together with "
                                 "quantize_comms")
        if comm.weights != "full":
            if internals.uses_all_gather_extension(group):
                raise ValueError(f"FSDP module {label!r} has parameters with an all-gather extension "
                                 "(fsdp_pre_all_gather, e.g. float8 all-gather): their all-gather "
                                 f"input is not their values, so weights={comm.weights!r} cannot "
                                 "quantize it; turn the extension off or use weights='full'")
            dtypes = internals.orig_dtypes(group)
            if len(dtypes) > 1:
                raise ValueError(f"FSDP module {label!r} holds parameters of several dtypes "
                                 f"{sorted(map(str, dtypes))}: FSDP all-gathers them as one byte "
                                 f"buffer, which weights={comm.weights!r} cannot quantize; give them "
                                 "one dtype or shard them in separate fully_shard modules")


def _check_same_layout(owned: list[tuple[str, Any, Any]], names: dict[int, str], comm: CommConfig,
                       topo: Topology) -> None:
    """Raise ValueError unless every rank of the shard group has the same modules, parameters and
    config: ranks that disagree would hang or exchange garbage in the first collective."""
    layout = [[name, [[s.fqn, s.numel] for s in internals.param_slots(g, names)]] for name, _, g in owned]
    layout.append(json.loads(json.dumps(comm.to_dict())))
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).digest()
    value = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64, device=topo.device)
    both = torch.cat([value, -value])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=topo.world_group)
    if int(both[0]) != -int(both[1]):
        raise ValueError("quantize_comms: ranks disagree on the FSDP modules, their parameters or the "
                         "CommConfig: build the same model with the same settings on every rank")


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a float tensor as a same-width signed integer tensor."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
