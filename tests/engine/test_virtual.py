"""Virtual ranks (one process playing W ranks) against the real multi-process engine on gloo, and
on their own: reproducibility, memory, checkpoints, bad input.

The real runs (halfbyte.comm.spawn) and the virtual runs use the same model, data, seeds and lr
schedule; every rank's loss, every grad norm, the final weights and the byte counts are compared.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import weakref

import pytest
import torch
from torch import nn

from halfbyte.comm import build_topology, emulate, spawn
from halfbyte.comm.accounting import CommStats
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.engine.seeds import GRADS, collective_seed
from halfbyte.engine.world import VirtualWorld
from halfbyte.quant import QuantSpec
from toys import make_mlp, regression_batch

STEPS = 5
OPTIM = AdamWConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
BUCKET_NUMEL = 400  # two buckets for the model below
SEED = 11
CLIP = 0.5  # below the gradient norms of these runs: clipping is active on every step


def rank_loss(model: nn.Module, step: int, rank: int, poison: tuple[int, int] | None) -> torch.Tensor:
    x, y = regression_batch(step, rank)
    loss = ((model(x) - y) ** 2).mean()
    return loss * float("inf") if poison == (step, rank) else loss


def lr_at(step: int) -> float:
    return OPTIM.lr * (1 - step / (2 * STEPS))


def nearest(config: CommConfig) -> CommConfig:
    """The same config with every codec rounding to nearest."""
    def fix(spec: QuantSpec | None) -> QuantSpec | None:
        return None if spec is None else dataclasses.replace(spec, rounding="nearest")
    return dataclasses.replace(config, weight_spec=fix(config.weight_spec), grad_spec=fix(config.grad_spec),
                               grad_intra_spec=fix(config.grad_intra_spec))


INT4_NEAREST = QuantSpec(bits=4, group_size=128, rounding="nearest")
# name -> (comm config, grad clip, (step, rank) whose loss is multiplied by inf, or None)
CASES = {
    "baseline": (CommConfig.preset("baseline"), CLIP, None),
    "int4-one-level": (CommConfig(grads="one-level", grad_spec=INT4_NEAREST), CLIP, None),
    "zeropp": (CommConfig.preset("zeropp"), CLIP, None),  # direct int8 weights, int4 two-level
    "sdp4bit-nearest": (nearest(CommConfig.preset("sdp4bit")), CLIP, None),
    "sdp4bit-nearest-skip": (nearest(CommConfig.preset("sdp4bit")), CLIP, (2, 1)),
    "sdp4bit-noclip": (nearest(CommConfig.preset("sdp4bit")), None, None),
    "sdp4bit": (CommConfig.preset("sdp4bit"), CLIP, None),  # stochastic rounding, same seeds
}


def _result(engine, losses, norms) -> dict:
    return {"losses": losses, "norms": norms, "stats": engine.stats.by_op(),
            "params": [p.detach().clone() for p in engine.module.parameters()],
            "weights": torch.cat([b.replica for b in engine.buckets]).clone(),
            "step_count": engine.step_count, "skipped": engine.skipped_steps}


def real_runs(gpus_per_node: int) -> dict:
    """One rank of the real engine: every case, STEPS steps. Losses as [step] of this rank."""
    torch.set_num_threads(1)
    topo = build_topology(gpus_per_node)
    out = {}
    for name, (comm, clip, poison) in CASES.items():
        model = make_mlp()
        engine = ShardedDataParallel(model, topo, optim=OPTIM, comm=comm, bucket_numel=BUCKET_NUMEL,
                                     grad_clip=clip, seed=SEED)
        topo.stats.reset()
        losses, norms = [], []
        for step in range(STEPS):
            loss = rank_loss(model, step, topo.rank, poison)
            loss.backward()
            norms.append(engine.step(lr_at(step)).grad_norm)
            engine.zero_grad()
            losses.append(loss.item())
        engine.wait_weights()  # the last step's all-gathers are still in flight (prefetch)
        out[name] = _result(engine, losses, norms)
    return out


def virtual_run(world: int, gpus_per_node: int, comm: CommConfig, clip: float | None,
                poison: tuple[int, int] | None = None, seed: int = SEED) -> dict:
    """The same run with virtual ranks. Losses as [step][rank]."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_mlp()
        engine = ShardedDataParallel(model, VirtualWorld(world, gpus_per_node), optim=OPTIM, comm=comm,
                                     bucket_numel=BUCKET_NUMEL, grad_clip=clip, seed=seed)
        losses, norms = [], []
        for step in range(STEPS):
            step_losses = []
            for rank in range(world):
                loss = rank_loss(model, step, rank, poison)
                with engine.as_rank(rank):
                    loss.backward()
                step_losses.append(loss.item())
            norms.append(engine.step(lr_at(step)).grad_norm)
            engine.zero_grad()
            losses.append(step_losses)
        return _result(engine, losses, norms)
    finally:
        torch.set_num_threads(threads)


def _compare(real: list[dict], world: int, gpus_per_node: int) -> dict[str, dict]:
    """Run every case virtually; return {case: {"virtual": ..., "real": per-step x rank losses}}."""
    out = {}
    for name, (comm, clip, poison) in CASES.items():
        v = virtual_run(world, gpus_per_node, comm, clip, poison)
        r = [real[rank][name] for rank in range(world)]
        assert all(x["stats"] == r[0]["stats"] for x in r), "the real ranks' byte counts differ"
        # Bytes: what the W real ranks send together, per collective and link class, exactly.
        together = {op: {k: world * n for k, n in row.items()} for op, row in r[0]["stats"].items()}  # calls too
        assert v["stats"] == together, (name, v["stats"], together)
        assert (v["step_count"], v["skipped"]) == (r[0]["step_count"], r[0]["skipped"]), name
        out[name] = {"virtual": v, "real_losses": [[x["losses"][s] for x in r] for s in range(STEPS)],
                     "real_norms": r[0]["norms"], "real_weights": r[0]["weights"]}
    return out


def _same(got: list, want: list, name: str) -> None:
    """Bit-identical floats (NaN equals NaN)."""
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as_tensor(got), as_tensor(want), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def _assert_identical(name: str, c: dict) -> None:
    v = c["virtual"]
    _same(v["losses"], c["real_losses"], name)
    _same(v["norms"], c["real_norms"], name)
    assert torch.equal(v["weights"], c["real_weights"]), name


def _first_difference(got: list[float], want: list[float]) -> int:
    """Index of the first value whose bits differ (len when none does)."""
    differ = (i for i, (x, y) in enumerate(zip(got, want)) if float(x).hex() != float(y).hex())
    return next(differ, len(got))


@pytest.mark.timeout(120)
def test_two_virtual_ranks_are_bit_identical_to_two_gloo_ranks():
    """W=2 as 2 nodes x 1: every case (baseline, one-level int4, zeropp, sdp4bit with nearest and
    with stochastic rounding, a non-finite skip, clipping on and off) gives bit-identical losses of
    both ranks, grad norms and final weights, and the same bytes per link class."""
    cases = _compare(spawn(real_runs, 2, 1, timeout_s=100), 2, 1)
    for name, c in cases.items():
        _assert_identical(name, c)
    assert min(cases["baseline"]["real_norms"]) > CLIP  # clipping was active throughout
    skip = cases["sdp4bit-nearest-skip"]["virtual"]
    assert math.isnan(skip["norms"][2]) and skip["skipped"] == 1 and skip["step_count"] == STEPS - 1


@pytest.mark.timeout(120)
def test_four_virtual_ranks_match_four_gloo_ranks_on_two_nodes():
    """W=4 as 2 nodes x 2 (two-level grads with a real intra-node hop).

    Bit-identical: every compressed case as long as the W partial squared grad norms sum to the
    same float in the virtual engine's rank order as in gloo's ring all-reduce (always with clipping
    off, where the norm does not reach the weights), and every case up to the step where that sum
    first differs. Not bit-identical, by construction: the uncompressed fp32 gradient mean (gloo's
    ring sums chunk j starting at rank j+2; the virtual engine in rank order 0..W-1) and, with
    clipping on, the clip coefficient through the norm's last bit. Those are float rounding only:
    losses and norms agree to 1e-5 relative, weights to 1e-6. Measured: the baseline's losses
    differ by 2e-8 relative from step 4 on; every compressed case is bit-identical."""
    cases = _compare(spawn(real_runs, 4, 2, timeout_s=100), 4, 2)
    _assert_identical("sdp4bit-noclip", cases["sdp4bit-noclip"])
    for name, c in cases.items():
        v = c["virtual"]
        first = 0 if name == "baseline" else _first_difference(v["norms"], c["real_norms"])
        if first == STEPS:
            _assert_identical(name, c)
            continue
        _same(v["losses"][: first + 1], c["real_losses"][: first + 1], name)  # weights still equal
        torch.testing.assert_close(torch.tensor(v["losses"]), torch.tensor(c["real_losses"]),
                                   rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(torch.tensor(v["norms"]), torch.tensor(c["real_norms"]),
                                   rtol=1e-5, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(v["weights"], c["real_weights"], rtol=0, atol=1e-6, msg=name)
    skip = cases["sdp4bit-nearest-skip"]["virtual"]
    assert math.isnan(skip["norms"][2]) and skip["skipped"] == 1 and skip["step_count"] == STEPS - 1


# ---- one process: layouts the gloo tests do not reach ------------------------------------------
@pytest.mark.parametrize("preset,world,gpus_per_node", [
    ("sdp4bit", 8, 2), ("sdp4bit", 8, 4), ("tlq", 6, 2), ("zeropp", 6, 3), ("one-level", 5, 5)])
def test_running_sums_equal_the_collectives_at_any_layout(preset, world, gpus_per_node):
    """The gradient shards the virtual engine reduces (running sums, W-independent memory) are
    bit-identical to halfbyte.comm.emulate's replay of the collectives, which builds and keeps every
    rank's messages, stochastic rounding included, for several node layouts; so are the bytes."""
    one_level = QuantSpec(bits=4, group_size=64, rounding="stochastic", hadamard=16)
    comm = (CommConfig(grads="one-level", grad_spec=one_level) if preset == "one-level"
            else CommConfig.preset(preset))
    model = make_mlp()
    engine = ShardedDataParallel(model, VirtualWorld(world, gpus_per_node), comm=comm, bucket_numel=BUCKET_NUMEL,
                                 seed=SEED)
    grads = []
    for rank in range(world):
        with engine.as_rank(rank):
            rank_loss(model, 0, rank, None).backward()
            grads.append([b.grad.clone() for b in engine.buckets])
    M = world // gpus_per_node
    replayed = CommStats()
    assert len(engine.buckets) > 1
    for b in engine.buckets:
        inputs = [g[b.index] for g in grads]
        seed = collective_seed(SEED, 0, b.index, GRADS)
        if comm.grads == "two-level":
            want = emulate.reduce_scatter_two_level(inputs, comm.grad_intra_spec, comm.grad_spec, seed, nodes=M,
                                                    out_dtype=torch.float32, stats=replayed)
        else:
            want = emulate.reduce_scatter(inputs, comm.grad_spec, seed, nodes=M, out_dtype=torch.float32,
                                          stats=replayed)
        got = engine.world.gradient_shards(b)
        assert any(not torch.equal(want[0], w) for w in want[1:])  # each rank its own chunk
        for r in range(world):
            assert torch.equal(got[r], want[r]), (preset, world, gpus_per_node, b.index, r)
    assert engine.stats.by_op() == replayed.by_op()


def test_eight_virtual_ranks_uncompressed_match_adamw_on_the_mean_gradient():
    """Baseline at W=8: the same as one torch.optim.AdamW (+ clip_grad_norm_) on the mean of the
    8 micro-batch gradients (fp32, float tolerance)."""
    world = 8
    ref = make_mlp()
    opt = torch.optim.AdamW(ref.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    v = virtual_run(world, 2, CommConfig.preset("baseline"), CLIP)
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(world):
            (rank_loss(ref, step, rank, None) / world).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
    for got, want in zip(v["params"], ref.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_same_seed_same_run_other_seed_other_run():
    comm = CommConfig.preset("sdp4bit")
    a, b = virtual_run(4, 2, comm, CLIP), virtual_run(4, 2, comm, CLIP)
    c = virtual_run(4, 2, comm, CLIP, seed=SEED + 1)
    _same(a["losses"], b["losses"], "same seed")
    assert torch.equal(a["weights"], b["weights"])
    assert not torch.equal(a["weights"], c["weights"])
    assert a["losses"][0] == c["losses"][0] and a["losses"][-1] != c["losses"][-1]


def test_memory_does_not_grow_with_the_number_of_virtual_ranks():
    """Running sums instead of per-rank buffers: per (padded) parameter value, 64 virtual ranks hold
    exactly what 4 do: fp32 replica, gradient, gradient sums, node sums, master (all shards
    together) and two AdamW moments = 28 bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.Tanh(), nn.Linear(512, 128))
    for world, L in ((4, 2), (64, 4)):
        engine = ShardedDataParallel(copy.deepcopy(model), VirtualWorld(world, L), comm=CommConfig.preset("tlq"),
                                     bucket_numel=10**6)
        padded = sum(b.padded_numel for b in engine.buckets)
        report = engine.memory_report()
        assert report["grad_sums"] == report["node_sums"] == 4 * padded, (world, report)
        assert report["total"] == 28 * padded, (world, report)


def test_a_deleted_engine_is_freed():
    """Hooks on the parameters hold the engine weakly: after a step and `del`, the engine and its
    model (replica, master weights, AdamW state) are garbage, not kept alive by autograd."""
    model = make_mlp()
    engine = ShardedDataParallel(model, VirtualWorld(2), comm=CommConfig.preset("qwd"), bucket_numel=BUCKET_NUMEL)
    for w in range(2):
        with engine.as_rank(w):
            rank_loss(model, 0, w, None).backward()
    engine.step(OPTIM.lr)
    refs = [weakref.ref(engine), weakref.ref(model)]
    del engine, model
    gc.collect()
    assert [r() is None for r in refs] == [True, True]


def _full(engine, rows) -> torch.Tensor:
    """The whole model's values of per-(rank, bucket) shards (master or moments) in parameter order,
    whatever the world size: what a checkpoint must carry across layouts."""
    parts = []
    for k, b in enumerate(engine.buckets):
        flat = torch.cat([row[k] for row in rows])[: b.numel]
        parts.append(flat)
    names = [n for b in engine.buckets for n in b.names]
    by_name = {}
    for k, b in enumerate(engine.buckets):
        for name, p, offset in zip(b.names, b.params, b.offsets):
            by_name[name] = parts[k][offset: offset + p.numel()]
    return torch.cat([by_name[n] for n in sorted(names)])


def test_checkpoint_resume_continues_the_same_losses_reshards_and_refuses_mismatches(tmp_path):
    comm = CommConfig.preset("sdp4bit")

    def fresh(world: int = 4, L: int = 2, config: CommConfig = comm, bucket_numel: int = BUCKET_NUMEL):
        model = make_mlp()
        return model, ShardedDataParallel(model, VirtualWorld(world, L), optim=OPTIM, comm=config,
                                          bucket_numel=bucket_numel, seed=SEED)

    def train(model, engine, steps) -> list[list[float]]:
        losses = []
        for step in steps:
            losses.append([])
            for rank in range(engine.world.world_size):
                loss = rank_loss(model, step, rank, None)
                with engine.as_rank(rank):
                    loss.backward()
                losses[-1].append(loss.item())
            engine.step(lr_at(step))
            engine.zero_grad()
        return losses

    model, engine = fresh()
    train(model, engine, range(2))
    engine.save_checkpoint(tmp_path / "ckpt", {"step": 2})
    saved = {name: _full(engine, getattr(engine, name)) for name in ("master", "exp_avg", "exp_avg_sq")}
    replica = [p.detach().clone() for p in model.parameters()]
    expected = train(model, engine, range(2, 4))
    model2, engine2 = fresh()
    assert engine2.load_checkpoint(tmp_path / "ckpt") == {"step": 2}
    assert engine2.step_count == 2
    assert train(model2, engine2, range(2, 4)) == expected

    # Another world size, node layout and bucket size: the same weights and optimizer state,
    # exactly (resharded by parameter name), and the replica every rank starts from.
    for world, L, bucket_numel in ((8, 2, BUCKET_NUMEL), (2, 1, 10**6), (4, 1, 150)):
        model3, engine3 = fresh(world, L, bucket_numel=bucket_numel)
        engine3.load_checkpoint(tmp_path / "ckpt")
        for name, want in saved.items():
            assert torch.equal(_full(engine3, getattr(engine3, name)), want), (world, L, name)
        for p, q in zip(model3.parameters(), replica):
            assert torch.equal(p, q), (world, L)
        assert engine3.step_count == 2
        train(model3, engine3, range(2, 3))  # and it trains on

    for kwargs, message in [({"config": CommConfig.preset("zeropp")}, "comm config")]:
        with pytest.raises(ValueError, match=message):
            fresh(**kwargs)[1].load_checkpoint(tmp_path / "ckpt")
    other = ShardedDataParallel(nn.Sequential(nn.Linear(8, 3)), VirtualWorld(2, 1), comm=comm)
    with pytest.raises(ValueError, match="different model"):
        other.load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="incomplete"):
        engine.load_checkpoint(tmp_path / "missing")


def test_bad_layouts_and_misuse_raise():
    comm = CommConfig.preset("baseline")
    for world, L, message in [(3, 2, "must divide world_size"), (0, None, "world_size must be a positive"),
                              (4, 0, "gpus_per_node must be a positive"), (2.0, 1, "world_size must be")]:
        with pytest.raises(ValueError, match=message):
            ShardedDataParallel(make_mlp(), VirtualWorld(world, L), comm=comm)
    with pytest.raises(ValueError, match="two-level.*2 nodes"):
        ShardedDataParallel(make_mlp(), VirtualWorld(4, 4), comm=CommConfig.preset("sdp4bit"))
    with pytest.raises(ValueError, match="grad_clip"):
        ShardedDataParallel(make_mlp(), VirtualWorld(2), comm=comm, grad_clip=0.0)

    model = make_mlp()
    engine = ShardedDataParallel(model, VirtualWorld(2), comm=comm, bucket_numel=BUCKET_NUMEL)
    with pytest.raises(RuntimeError, match=r"outside engine.as_rank"):
        rank_loss(model, 0, 0, None).backward()
    engine.zero_grad()
    with pytest.raises(ValueError, match="expected rank 0, got 1"):
        with engine.as_rank(1):
            pass
    with engine.as_rank(0):
        rank_loss(model, 0, 0, None).backward()
    with pytest.raises(RuntimeError, match="all 2 virtual ranks, got 1"):
        engine.step()
    with pytest.raises(RuntimeError, match=r"inside as_rank"):
        with engine.as_rank(1):
            with engine.as_rank(1):
                pass
    # A discarded partial step leaves no trace: the next full step equals a fresh engine's.
    engine.zero_grad()
    fresh_model = make_mlp()
    fresh_engine = ShardedDataParallel(fresh_model, VirtualWorld(2), comm=comm, bucket_numel=BUCKET_NUMEL)
    for m, e in ((model, engine), (fresh_model, fresh_engine)):
        for rank in range(2):
            with e.as_rank(rank):
                rank_loss(m, 0, rank, None).backward()
        e.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))
