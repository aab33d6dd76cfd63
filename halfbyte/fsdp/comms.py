"""halfbyte's AllGather and ReduceScatter for FSDP2 (`FSDPModule.set_custom_all_gather` /
`set_custom_reduce_scatter`): one object pair per FSDP parameter group.

What FSDP2 hands them (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py):
  all-gather      output: [W * n] in param_dtype (bf16 under mixed precision), input: this rank's
                  n values, a view of output at offset rank * n (the concatenated padded shards).
                  FSDP copies output's W rows out into the unsharded parameters afterwards.
  reduce-scatter  input: [W * c] in reduce_dtype, row r = chunk r of every (padded) gradient, so
                  rank r's reduced chunk is row r; output: c values. op is AVG, SUM (fp16 and
                  set_force_sum_reduction_for_comms, with FSDP's own pre/post division around
                  the call) or PREMUL_SUM(1/factor) (set_gradient_divide_factor; torchtitan sets 1).
At a world size of 1 FSDP2 calls neither: there is nothing to communicate, so nothing to quantize.

Both decode synchronously into output and return None: on NCCL the waits inside halfbyte's
collectives are stream dependencies, so the host does not block, and the event FSDP records on its
communication stream after the call covers the decode too.

Seeds: every quantization's base seed is mix_seed(seed, group index, stream, counter), the same on
every rank (FSDP2 issues the same collectives in the same order everywhere), and the collectives
make it per rank and hop with rank_seed. counter: qWD's update count (restored with the replica,
so a resumed run draws the same noise), else the group's call count of that stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from halfbyte.comm.accounting import all_gather_bytes, reduce_scatter_bytes
from halfbyte.comm.collectives import all_gather_q, mix_seed, reduce_scatter_q, reduce_scatter_two_level
from halfbyte.comm.config import CommConfig
from halfbyte.comm.topology import Topology
from halfbyte.fsdp import internals

# Which collective of a group a seed is for.
WEIGHTS = 0
GRADS = 1

# CommStats op names this package records besides the collectives' own ("all_gather",
# "reduce_scatter", "reduce_scatter_two_level").
OP_REPLICA_INIT = "replica_init"          # qWD's first, uncompressed all-gather into the replica
OP_FROM_REPLICA = "all_gather_from_replica"  # a re-gather of unchanged weights: 0 bytes sent

_RedOp = dist.ReduceOp.RedOpType
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GroupComm:
    """What both comms of one FSDP parameter group share: the group, topology, config, seed."""

    def __init__(self, name: str, index: int, group: Any, topo: Topology, comm: CommConfig,
                 seed: int) -> None:
        self.name, self.index, self.group = name, index, group
        self.topo, self.comm, self.seed = topo, comm, seed
        self._checked: set[int] = set()

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _check_group(self, group: dist.ProcessGroup) -> None:
        """FSDP must call over the topology's ranks: its own shard group, not e.g. a post-forward
        mesh or a separate reduce-scatter group set after quantize_comms."""
        if id(group) in self._checked:
            return
        ranks = dist.get_process_group_ranks(group)
        expected = dist.get_process_group_ranks(self.topo.world_group)
        if ranks != expected:
            raise RuntimeError(f"FSDP module {self.name!r} communicates over ranks {ranks}, but halfbyte's "
                               f"topology spans {expected}: quantize_comms was installed for another "
                               "group (reshard_after_forward=<int> or set_separate_reduce_scatter_group "
                               "after quantize_comms are not supported)")
        self._checked.add(id(group))

    def _seed(self, stream: int, counter: int) -> int:
        return mix_seed(self.seed, self.index, stream, counter)


class HalfbyteAllGather(_GroupComm, AllGather):
    """The weight all-gather of one FSDP parameter group in CommConfig.weights' mode.

    full   FSDP's own all-gather, counted (bit-identical to plain FSDP2).
    direct the param_dtype shard quantized (ZeRO++ qwZ); every rank, the owner too, decodes the
           same bytes. ZeRO-3 memory: nothing persists between gathers.
    qwd    a persistent replica of the group's unsharded weights in param_dtype (W * n values).
           The first gather fills it uncompressed; after that, when the weights changed, the owner
           sends the quantized difference (fp32 master shard - its replica rows) and every rank adds
           the same decoded bytes, so the replicas stay bit-identical and the quantization error
           never accumulates; when they did not change (the backward re-gather under
           reshard_after_forward=True, a second forward without a step) the output is copied from
           the replica and nothing is sent (recorded as OP_FROM_REPLICA with 0 bytes).

    "Changed" = the version counters (and storage addresses) of the group's sharded parameters
    differ from those at the last send (internals.shard_versions). Why version counters and not a
    step counter: every in-place write to a parameter bumps them, whoever makes it (any optimizer,
    load_state_dict, a manual copy_ under no_grad), with no hook to register, no pass over the data
    and no collective; and they are rank-consistent, because FSDP2 training writes the parameters
    SPMD (every rank's optimizer updates its own shard of every parameter). Not seen: writes
    through `param.data` or under torch.autograd._unsafe_preserve_version_counter, which bypass
    the counter; after such a write call QuantizedComms.resend_weights().

    The difference is taken against the fp32 sharded parameter (FSDP's master), not against the
    param_dtype all-gather input: FSDP's mixed precision keeps the fp32 shard
    (FSDPParam._sharded_param_data) and casts it only for the all-gather, so the exact master is
    there to read, and a difference against it carries updates smaller than one bf16 step of the
    weight, which the cast would round away before quantization.
    """

    def __init__(self, name: str, index: int, group: Any, topo: Topology, comm: CommConfig,
                 seed: int) -> None:
        super().__init__(name, index, group, topo, comm, seed)
        self.replica: torch.Tensor | None = None
        self.updates = 0          # qWD differences applied to the replica
        self.calls = 0            # direct-mode gathers (their seed counter)
        self.sent_versions: tuple[tuple[int, int, int], ...] | None = None

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> dist.Work | None:
        self._check_group(group)
        c, topo = self.comm, self.topo
        if c.weights == "full":
            work = _all_gather_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
            sent = all_gather_bytes(input_tensor.numel(), input_tensor.element_size(), topo.nodes,
                                    topo.gpus_per_node)
            topo.stats.record("all_gather", sent)
            return work
        if not output_tensor.is_floating_point():
            raise RuntimeError(f"FSDP module {self.name!r} all-gathers a {output_tensor.dtype} byte "
                               "buffer (parameters of several dtypes or an all-gather extension): "
                               "halfbyte cannot quantize it; use CommConfig weights='full' for it")
        with torch.no_grad():
            if c.weights == "direct":
                self.calls += 1
                all_gather_q(input_tensor, c.weight_spec, topo, out=output_tensor,
                             seed=self._seed(WEIGHTS, self.calls))
            else:
                self._gather_qwd(output_tensor, input_tensor)
        return None

    def _gather_qwd(self, output: torch.Tensor, inp: torch.Tensor) -> None:
        topo, n = self.topo, inp.numel()
        versions = internals.shard_versions(self.group)
        if self.replica is None:
            self.replica = torch.empty_like(output)
            _all_gather_tensor(self.replica, inp, group=topo.world_group)
            topo.stats.record(OP_REPLICA_INIT, all_gather_bytes(n, inp.element_size(), topo.nodes,
                                                                 topo.gpus_per_node))
        elif versions != self.sent_versions:
            master = internals.master_shard(self.group, inp.device)
            if master.numel() != n:
                raise RuntimeError(f"FSDP module {self.name!r}: the sharded parameters hold "
                                   f"{master.numel()} values but FSDP all-gathers {n}")
            self.updates += 1
            own = self.replica[topo.rank * n:(topo.rank + 1) * n]
            all_gather_q(master, self.comm.weight_spec, topo, out=self.replica, accumulate=True,
                         seed=self._seed(WEIGHTS, self.updates), subtract=own)
        else:
            topo.stats.record(OP_FROM_REPLICA, {"intra": 0, "inter": 0},
                              all_gather_bytes(n, inp.element_size(), topo.nodes, topo.gpus_per_node))
        self.sent_versions = versions
        output.copy_(self.replica)


class HalfbyteReduceScatter(_GroupComm, ReduceScatter):
    """The gradient reduce-scatter of one FSDP parameter group in CommConfig.grads' mode: full
    (FSDP's own, counted: bit-identical to plain FSDP2), one-level (reduce_scatter_q) or two-level
    (reduce_scatter_two_level, TLq-HS). Quantized modes sum (or average) in fp32 and cast once
    into output's dtype (bf16 or fp32; fp16 works the same way)."""

    def __init__(self, name: str, index: int, group: Any, topo: Topology, comm: CommConfig,
                 seed: int) -> None:
        super().__init__(name, index, group, topo, comm, seed)
        self.calls = 0

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> dist.Work | None:
        self._check_group(group)
        c, topo = self.comm, self.topo
        if c.grads == "full":
            work = _reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op)
            topo.stats.record("reduce_scatter", reduce_scatter_bytes(
                input_tensor.numel(), input_tensor.element_size(), topo.nodes, topo.gpus_per_node))
            return work
        kind, factor = self._reduction(op)
        self.calls += 1
        seed = self._seed(GRADS, self.calls)
        with torch.no_grad():
            if c.grads == "two-level":
                reduced = reduce_scatter_two_level(input_tensor, c.grad_intra_spec, c.grad_spec, topo,
                                                   op=kind, out_dtype=torch.float32, seed=seed)
            else:
                reduced = reduce_scatter_q(input_tensor, c.grad_spec, topo, op=kind,
                                           out_dtype=torch.float32, seed=seed)
            if factor is not None:
                reduced.mul_(factor)
            output_tensor.copy_(reduced)
        return None

    def _reduction(self, op: Any) -> tuple[str, float | None]:
        """FSDP's op as (halfbyte op, post-multiplier): PREMUL_SUM(f) sums f * x over ranks, the
        same as f * (the sum), which is applied to the fp32 sum before the cast."""
        kind = getattr(op, "op", op)
        if kind == _RedOp.AVG:
            return "avg", None
        if kind == _RedOp.SUM:
            return "sum", None
        if kind == _RedOp.PREMUL_SUM:
            return "sum", self._premul_factor(op)
        raise ValueError(f"FSDP module {self.name!r} reduce-scatters with {kind}: halfbyte's "
                         "quantized reduce-scatter supports AVG, SUM and PREMUL_SUM")

    def _premul_factor(self, op: Any) -> float:
        factor = getattr(op, "factor", None)  # torch >= 2.13 exposes it on the op
        if factor is None:  # torch 2.11: FSDP built the op as PREMUL_SUM(1 / gradient_divide_factor)
            divide = internals.gradient_divide_factor(self.group)
            if divide is None:
                raise RuntimeError(f"FSDP module {self.name!r} passed PREMUL_SUM without a "
                                   "gradient_divide_factor: cannot tell its factor on this torch")
            return 1.0 / divide
        return float(factor.item() if isinstance(factor, torch.Tensor) else factor)
