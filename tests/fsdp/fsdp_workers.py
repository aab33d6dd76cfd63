"""Per-rank bodies of the FSDP2 tests (run through halfbyte.comm.spawn on gloo CPU ranks).

Each worker batches several checks into one spawned job (process start-up dominates on 2 cores);
assertions fail inside the rank and surface in the parent as WorkerError with the traceback.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from halfbyte.comm import topology_from_mesh  # where docs/CONTRACTS.md says it is
from halfbyte.comm.accounting import all_gather_bytes, reduce_scatter_bytes, reduce_scatter_two_level_bytes
from halfbyte.comm.config import CommConfig
from halfbyte.fsdp import OP_FROM_REPLICA, OP_REPLICA_INIT, QuantizedComms, quantize_comms, shard_model
from halfbyte.fsdp.quantize import COUNTERS_KEY
from halfbyte.train.model import GPT, GPTConfig

VOCAB, CTX = 64, 32
LR = 3e-3

# A fixed Markov chain over the vocabulary: token t is followed by NEXT[t] with probability 0.9,
# else by a uniform token, so the loss has a floor well below log(VOCAB) that a small GPT reaches.
_chain = torch.Generator().manual_seed(4242)
NEXT = torch.randperm(VOCAB, generator=_chain)


def make_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=64, ctx=CTX))


def tokens(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.empty(n, CTX + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(CTX):
        jump = torch.rand(n, generator=g) < 0.1
        seq[:, t + 1] = torch.where(jump, torch.randint(VOCAB, (n,), generator=g), NEXT[seq[:, t]])
    return seq[:, :-1], seq[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def global_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def sharded(model: nn.Module, mesh, mp: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Plain FSDP2, the reference: fully_shard per block plus the root."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
    return model


def train(model: nn.Module, steps: int, handle: QuantizedComms | None = None) -> dict:
    """AdamW on the DTensor parameters; per-step local losses, the final held-out loss (mean over
    ranks), and (with a handle) a replica check after every step."""
    rank = dist.get_rank()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(steps):
        x, y = tokens(1000 * step + rank)
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if handle is not None:
            handle.check_replicas()
    with torch.no_grad():
        x, y = tokens(999_999 + rank, n=32)
        held_out = global_mean(lm_loss(model, x, y).item())
    return {"losses": losses, "held_out": held_out, "opt": opt}


def local_params(model: nn.Module) -> list[torch.Tensor]:
    """This rank's shards (a root without reshard_after_forward keeps its last forward's
    unsharded parameters registered until resharded)."""
    model.reshard()
    return [p.to_local().detach().clone() for p in model.parameters()]


def expected_bytes(handle: QuantizedComms, steps: int, comm: CommConfig, elem: int) -> dict[str, int]:
    """Bytes this rank must have sent, per op, after `steps` training steps and one held-out
    forward, predicted from halfbyte.comm.accounting alone. shard_model: each step gathers every
    block in forward and again in backward (reshard_after_forward=True), the root in forward only."""
    topo = handle.topo
    M, L, W = topo.nodes, topo.gpus_per_node, topo.world_size
    out: dict[str, int] = {}

    def add(op: str, sent: dict[str, int], times: int) -> None:
        out[op] = out.get(op, 0) + times * sum(sent.values())

    forwards = steps + 1
    for name, n in handle.shard_numels().items():
        backwards = steps if name else 0  # the root ("") keeps its weights unsharded for backward
        if comm.weights == "full":
            add("all_gather", all_gather_bytes(n, elem, M, L), forwards + backwards)
        elif comm.weights == "direct":
            add("all_gather", all_gather_bytes(n, comm.weight_spec, M, L), forwards + backwards)
        else:  # qwd: the first forward fills the replica; later forwards follow a step; backward is free
            add(OP_REPLICA_INIT, all_gather_bytes(n, elem, M, L), 1)
            add("all_gather", all_gather_bytes(n, comm.weight_spec, M, L), forwards - 1)
            add(OP_FROM_REPLICA, {"intra": 0, "inter": 0}, backwards)
        if comm.grads == "full":
            add("reduce_scatter", reduce_scatter_bytes(W * n, elem, M, L), steps)
        elif comm.grads == "one-level":
            add("reduce_scatter", reduce_scatter_bytes(W * n, comm.grad_spec, M, L), steps)
        else:
            add("reduce_scatter_two_level",
                reduce_scatter_two_level_bytes(W * n, comm.grad_intra_spec, comm.grad_spec, M, L), steps)
    return out


def recorded_bytes(handle: QuantizedComms) -> dict[str, int]:
    return {op: v["intra"] + v["inter"] for op, v in handle.stats.by_op().items()}


# ---- presets vs plain FSDP2 ---------------------------------------------------------------------
def presets_vs_plain(presets: list[str], steps: int, gpus_per_node: int) -> dict:
    """Plain FSDP2 and each preset through shard_model, same model, data and optimizer. Asserts
    (inside the rank): baseline bit-identical to plain (every loss, every final parameter and
    AdamW state), replicas bit-identical after every step (check_replicas), bytes per op exactly as
    the accounting formulas predict. Returns the held-out losses and the stats for the parent."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    plain_model = sharded(make_gpt(), mesh)
    plain = train(plain_model, steps)
    results: dict = {"plain": {"held_out": plain["held_out"], "first": plain["losses"][0]}}
    for preset in presets:
        comm, _ = CommConfig.preset(preset).for_nodes(world // gpus_per_node)
        model = make_gpt()
        handle = shard_model(model, mesh, comm, gpus_per_node=gpus_per_node, seed=7)
        run = train(model, steps, handle)
        if preset == "baseline":
            assert run["losses"] == plain["losses"], (run["losses"], plain["losses"])
            for a, b in zip(local_params(model), local_params(plain_model)):
                assert torch.equal(a, b)
            for sa, sb in zip(run["opt"].state.values(), plain["opt"].state.values()):
                assert torch.equal(sa["exp_avg"].to_local(), sb["exp_avg"].to_local())
        recorded, expected = recorded_bytes(handle), expected_bytes(handle, steps, comm, elem=4)
        assert recorded == expected, (preset, recorded, expected)
        results[preset] = {"held_out": run["held_out"], "summary": handle.stats.summary(),
                           "by_op": handle.stats.by_op(), "replica_nbytes": handle.replica_nbytes()}
    return results


# ---- qWD details on 2 ranks: re-gathers, mixed precision, resume, corrupted replica ------------
def qwd_details(steps: int) -> dict:
    """One job for: (1) a re-gather of unchanged weights sends nothing (backward, a second forward
    without a step) and a step makes the next forward send; resend_weights forces one; (2) bf16
    mixed precision (fp32 masters, bf16 replica) trains and keeps replicas identical; (3) a resume
    from replica_state_dict + model/optimizer state continues bit-identically; (4) a corrupted
    replica is reported by module name."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    comm = CommConfig.preset("sdp4bit").for_nodes(world)[0]  # 2 ranks as 2 nodes x 1
    out: dict = {}

    # (1) unchanged re-gathers are served from the replica
    model = make_gpt()
    handle = shard_model(model, mesh, comm, gpus_per_node=1, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x, y = tokens(rank)

    def sent() -> int:
        return sum(handle.stats.totals().values())

    lm_loss(model, x, y).backward()                       # forward fills the replicas
    after_first = dict(recorded_bytes(handle))
    opt.step()
    opt.zero_grad()
    before = sent()
    loss = lm_loss(model, x, y)
    forward_bytes = sent() - before
    ag_after_forward = handle.stats.by_op()["all_gather"]["intra"] + handle.stats.by_op()["all_gather"]["inter"]
    loss.backward()
    ag_after_backward = handle.stats.by_op()["all_gather"]["intra"] + handle.stats.by_op()["all_gather"]["inter"]
    with torch.no_grad():
        before = sent()
        lm_loss(model, x, y)                              # no step since: nothing to send
        out["second_forward_bytes"] = sent() - before
        model.reshard()  # the root keeps its gathered weights after a forward: make every group gather
        handle.resend_weights()
        before = sent()
        lm_loss(model, x, y)
        out["resend_bytes"] = sent() - before
    out.update(forward_bytes=forward_bytes, backward_gather_bytes=ag_after_backward - ag_after_forward,
               from_replica=handle.stats.by_op()[OP_FROM_REPLICA], first=after_first)
    opt.zero_grad()

    # (2) bf16 mixed precision: the difference is taken against the fp32 master
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plain = train(sharded(make_gpt(), mesh, mp), steps)
    model = make_gpt()
    handle = shard_model(model, mesh, comm, gpus_per_node=1, mp_policy=mp, seed=3)
    run = train(model, steps, handle)
    replicas = [g.gather.replica for g in handle._groups]
    assert all(r.dtype == torch.bfloat16 for r in replicas), [r.dtype for r in replicas]
    out["mp"] = {"plain": plain["held_out"], "sdp4bit": run["held_out"],
                 "replica_nbytes": handle.replica_nbytes()}

    # (3) resume: stop after k steps, restore everything into a fresh model, continue
    k, more = 4, 3
    model = make_gpt()
    handle = shard_model(model, mesh, comm, gpus_per_node=1, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(m: nn.Module, o: torch.optim.Optimizer, i: int) -> float:
        xs, ys = tokens(77 * i + rank)
        loss = lm_loss(m, xs, ys)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss.item()

    for i in range(k):
        step(model, opt, i)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_replica = handle.replica_state_dict()
    counters = [v for key, v in saved_replica.items() if key.endswith(COUNTERS_KEY)]
    # saved after a step: k qWD updates (the first forward filled the replica), k reduce-scatters, stale
    assert counters and all(v.tolist() == [k - 1, k, 1] for v in counters), counters
    # identical on every rank: compare checksums across ranks
    sums = torch.stack([v.double().sum() for key, v in sorted(saved_replica.items())])
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    continued = [step(model, opt, i) for i in range(k, k + more)]

    fresh = make_gpt()
    fresh_handle = shard_model(fresh, mesh, comm, gpus_per_node=1, seed=11)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    fresh_handle.load_replica_state_dict(saved_replica)
    resumed = [step(fresh, fresh_opt, i) for i in range(k, k + more)]
    assert resumed == continued, (resumed, continued)
    for a, b in zip(local_params(fresh), local_params(model)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no entry for"):
        fresh_handle.load_replica_state_dict({})

    # (4) a corrupted replica names its module
    if rank == 1:
        [g for g in fresh_handle._groups if g.name == "blocks.1"][0].gather.replica[5] += 1.0
    with pytest.raises(RuntimeError, match=r"replica of FSDP module 'blocks.1'.*differs between ranks"):
        fresh_handle.check_replicas()
    return out


# ---- what quantize_comms refuses ----------------------------------------------------------------
class MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_parameter("frozen", nn.Parameter(torch.ones(8, dtype=torch.bfloat16),
                                                       requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.frozen.float()


def two_ranks_details(steps: int) -> dict:
    """qwd_details, reduce_ops and refusals in one spawned job."""
    return {"qwd": qwd_details(steps), "ops": reduce_ops(), "refusals": refusals()}


def reduce_ops() -> dict:
    """Every op FSDP2 passes, on a deterministic (nearest-rounding) one-level codec: AVG = SUM / 2,
    PREMUL_SUM(f) = f * SUM exactly (factor read from the op, and on torch 2.11, which does not
    expose it, from the group's gradient_divide_factor), an unsupported op raises."""
    from halfbyte.fsdp.comms import HalfbyteReduceScatter
    from halfbyte.quant import QuantSpec

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = sharded(make_gpt(), mesh)
    comm = CommConfig(grads="one-level", grad_spec=QuantSpec(bits=8, group_size=128))
    handle = quantize_comms(model, comm, topology_from_mesh(mesh, 1))
    scatter = handle._groups[1].scatter
    assert isinstance(scatter, HalfbyteReduceScatter)
    group = mesh.get_group()
    inp = torch.randn(2 * 300, generator=torch.Generator().manual_seed(dist.get_rank()))

    def run(op) -> torch.Tensor:
        out = torch.empty(300)
        scatter(out, inp, group, op)
        return out

    total = run(dist.ReduceOp.SUM)
    assert torch.equal(run(dist.ReduceOp.AVG), total / 2)
    premul = dist._make_nccl_premul_sum(0.25)  # as FSDP2 builds it (ReduceOp.PREMUL_SUM(f) needs torch >= 2.13)
    if getattr(premul, "factor", None) is not None:  # torch >= 2.13 exposes the factor; 2.11: below
        assert torch.equal(run(premul), total * 0.25)

    class OpWithoutFactor:  # what torch 2.11's _make_nccl_premul_sum gives Python
        op = dist.ReduceOp.RedOpType.PREMUL_SUM

    scatter.group.gradient_divide_factor = 4.0
    assert torch.equal(run(OpWithoutFactor()), total * 0.25)
    bf16_out = torch.empty(300, dtype=torch.bfloat16)
    scatter(bf16_out, inp.bfloat16(), group, dist.ReduceOp.AVG)
    assert torch.allclose(bf16_out.float(), total / 2, rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="supports AVG, SUM and PREMUL_SUM"):
        run(dist.ReduceOp.MAX)
    return {"max_abs_sum": float(total.abs().max())}


def refusals() -> dict:
    """Every case quantize_comms cannot quantize raises ValueError with its reason and fix."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    sdp = CommConfig.preset("sdp4bit")
    with pytest.raises(ValueError, match="no fully_shard module"):
        quantize_comms(make_gpt(), sdp)
    with pytest.raises(ValueError, match="two-level.*needs at least 2 nodes.*for_nodes"):
        shard_model(make_gpt(), mesh, sdp, gpus_per_node=world)
    model = make_gpt()
    handle = shard_model(model, mesh, sdp.for_nodes(1)[0], gpus_per_node=world)
    with pytest.raises(ValueError, match="already has halfbyte's comms"):
        quantize_comms(model, sdp.for_nodes(1)[0])
    with pytest.raises(ValueError, match="keeps no state"):
        quantize_comms(sharded(make_gpt(), mesh), CommConfig.preset("baseline")
                       ).load_replica_state_dict({"x": torch.zeros(1)})
    mixed = MixedDtypes()
    fully_shard(mixed, mesh=mesh)
    with pytest.raises(ValueError, match=r"several dtypes.*byte\s+buffer"):
        quantize_comms(mixed, CommConfig.preset("qwd"))
    quantize_comms(mixed, CommConfig.preset("baseline"))   # uncompressed weights pass any buffer
    alloc = sharded(make_gpt(), mesh)
    alloc.set_allocate_memory_from_process_group_for_comm(True)
    with pytest.raises(ValueError, match="ProcessGroupAllocAllGather"):
        quantize_comms(alloc, CommConfig.preset("qwd"))
    hsdp_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    hsdp = make_gpt()
    fully_shard(hsdp, mesh=hsdp_mesh)
    with pytest.raises(ValueError, match="hsdp mesh.*1-D"):
        quantize_comms(hsdp, CommConfig.preset("qwd"))
    return {"untouched_calls": handle.stats.summary()["calls"]}


# ---- 4 ranks: dp x tp, reshard_after_forward=<int> ------------------------------------------
class FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class TPNet(nn.Module):
    """Regression through residual feed-forward blocks (Megatron column/row TP on each)."""

    def __init__(self, d: int = 32, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(FeedForward(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


_teacher = torch.Generator().manual_seed(12345)
TEACHER = torch.randn(8, 1, generator=_teacher)


def regression(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.tanh(x @ TEACHER)


def tp_train(preset: str | None, steps: int) -> dict:
    """dp 2 x tp 2 (tp inside each of the 2 emulated nodes of 2 ranks): TP by parallelize_module
    on "tp", fully_shard on "dp", halfbyte over the dp groups ({0, 2} and {1, 3}: 2 nodes x 1)."""
    world_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = world_mesh["dp"]
    model = TPNet()
    for block in model.blocks:
        parallelize_module(block, world_mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    handle = None
    if preset is None:
        sharded_blocks = model.blocks
        for block in sharded_blocks:
            fully_shard(block, mesh=dp)
        fully_shard(model, mesh=dp)
    else:
        handle = shard_model(model, dp, CommConfig.preset(preset), gpus_per_node=2, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dp_rank = dp.get_local_rank()
    losses = []
    for step in range(steps):
        x, y = regression(100 * step + dp_rank)   # the two tp ranks of a dp rank see the same data
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if handle is not None:
            handle.check_replicas()
    result = {"first": losses[0], "last": sum(losses[-5:]) / 5, "losses": losses}
    if handle is not None:
        result["topo"] = (handle.topo.nodes, handle.topo.gpus_per_node, handle.topo.world_size)
        result["summary"] = handle.stats.summary()
        result["by_op"] = handle.stats.by_op()
        if handle.comm.weights == "qwd":
            up = handle.replica_state_dict()["blocks.0.up.weight"]
            result["replica_up"] = (type(up).__name__, tuple(up.shape), tuple(up.to_local().shape),
                                    str(up.placements))
    return result


def four_ranks(presets: list[str], steps: int, tp_steps: int) -> dict:
    """One 4-rank job: presets vs plain FSDP2 on 2 nodes x 2, dp x tp with sdp4bit next to plain
    FSDP2 + TP (and baseline bit-identical to it), and the reshard_after_forward=<int> refusal."""
    out = {"presets": presets_vs_plain(presets, steps, gpus_per_node=2)}
    out["tp_plain"] = tp_train(None, tp_steps)
    out["tp_baseline"] = tp_train("baseline", tp_steps)
    out["tp_sdp4bit"] = tp_train("sdp4bit", tp_steps)
    assert out["tp_baseline"]["losses"] == out["tp_plain"]["losses"]
    model = make_gpt()
    mesh = init_device_mesh("cpu", (4,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=2)
    fully_shard(model, mesh=mesh)
    with pytest.raises(ValueError, match=r"reshard_after_forward=<int>"):
        quantize_comms(model, CommConfig.preset("qwd"))
    world_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    on_dp = sharded(make_gpt(), world_mesh["dp"])
    with pytest.raises(ValueError, match="topo spans ranks"):
        quantize_comms(on_dp, CommConfig.preset("qwd"), topology_from_mesh(world_mesh["tp"], 2))
    return out
